"""Benchmarks and plans behind ``megatron-pz bench KIND``.

  archs.py     model architectures without weights (presets, HF folders, checkpoints, run configs)
  validate.py  ``bench plan``: dry-run validation of a run config for a world size (CPU, seconds)
  scaling.py   ``bench scaling``: grid sweep of parallel layouts -> CSV + PNG (planned, then measured)
  measure.py   one layout's train step, timed, in its own world (local spawn, or one rank under torchrun)
  plot.py      the sweep's figure

The memory and FLOP model itself is ``megatron_pz.planner`` (pure functions).
"""
