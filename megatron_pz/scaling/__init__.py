"""Scaling studies behind ``megatron-pz scaling``: a grid of parallel layouts, planned, then measured.

  sweep.py    the grid (``SweepSpec``): check and plan every point, write/run/collect the points, CSV
  measure.py  one layout's real train step, timed, in its own world (local spawn, or one rank under torchrun)
  plot.py     the sweep's figure
  cli.py      the ``scaling`` subcommand

The memory and FLOP model the points are planned with is ``megatron_pz.plan``.
"""
