"""Benchmarks of megatron_pz against other trainers; not part of the installed package.

    python -m benchmarks.compare --config examples/bench_cpu.yaml --out runs/bench/compare

  compare.py   the command: ours vs TRL's GRPOTrainer vs plain ``generate`` on one workload -> bench.json / .md
  workload.py  the exact prompts (token ids) and targets ``megatron-pz train`` makes for a run file
  sides.py     the TRL and plain-generate sides, each run in its own process
  trl_grpo.py  TRL's GRPOTrainer as a library: prompts + reward + our hyper-parameters -> per-step rewards
  procs.py     running a side and measuring its process tree (time, CPU, peak memory, load)
  peaks.py     the peak memory of a process tree from the kernel's high-water marks
  report.py    the figures and tables (pure)

``benchmarks`` imports ``megatron_pz``; ``megatron_pz`` never imports ``benchmarks``. Run from the repository root
(``python -m`` puts it on ``sys.path``); TRL comes with the ``bench`` extra (``pip install -e '.[bench]'``).
"""
