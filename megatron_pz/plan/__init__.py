"""The pre-flight planner behind ``megatron-pz plan`` (and the scaling sweep's verdicts): pure arithmetic first.

  layout.py       the inputs: parallel ``Layout`` (TP x PP x CP x DP, EP/ETP, SP) and per-rank ``Workload``
  params.py       parameters one rank holds, per layer and per pipeline stage
  activations.py  what autograd keeps for backward (Korthikanti et al. 2022), and the loss's logits
  memory.py       ``plan_memory``: bytes per GPU of every stage, the worst one, and ``fits`` with a remedy
  flops.py        model FLOPs per token and datasheet peaks (MFU)
  archs.py        model architectures without weights: presets, HF folders, checkpoints, run configs
  dry_run.py      ``megatron-pz plan``: every check of a run config for a world size, on CPU in seconds
  cli.py          the ``plan`` subcommand
"""
