"""Training-run logging: what people see on the console and what the run folder records.

  * ``console``: ``configure_console`` (library chatter -> ``<output_dir>/train.log``, the console for people),
    ``say``, the one-line-per-step format and the progress bar;
  * ``library_output``: what libraries print (warnings, progress bars, stderr text, also in child processes) goes
    to that log file, held in memory until the config names it;
  * ``writers``: ``metrics.jsonl``, ``data_order.jsonl``, TensorBoard events, sample dumps (resume-safe);
  * ``run_logger``: ``RunLogger``, the rank-0 sink composing both;
  * ``reduce``: ``reduce_step``, every rank's metrics and samples -> one step's scalars on rank 0 (pure);
  * ``stats``: ``sample_scalars`` / ``sample_histograms``, one step's Samples -> task metrics (pure);
  * ``timer``: ``StepTimer``, wall time per phase of a step (pure).
"""
from megatron_pz.logs.console import configure_console, say, step_line
from megatron_pz.logs.reduce import paragraph_ids, reduce_step
from megatron_pz.logs.run_logger import RunLogger
from megatron_pz.logs.stats import sample_histograms, sample_scalars
from megatron_pz.logs.timer import StepTimer

__all__ = ["RunLogger", "StepTimer", "configure_console", "paragraph_ids", "reduce_step", "sample_histograms",
           "sample_scalars", "say", "step_line"]
