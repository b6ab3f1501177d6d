"""megatron_pz: PretrainZero reinforcement active pretraining on Megatron-Core.

Importing the package starts nothing and imports neither Megatron nor CUDA libraries. In a process that a training
run started with "spawn" (Megatron's checkpoint helpers, ``parallel.spawn_local``'s ranks), which imports the
package before its work, it sends that process's warnings and library output to the run's log file
(``logs.library_output``): Megatron warns while it is imported, and the console is for people.
"""
import os as _os

__version__ = "0.1.0"

if _os.environ.get("MEGATRON_PZ_LOG_FILE"):  # logs.library_output.LOG_FILE_ENV: this process belongs to a run
    import multiprocessing as _mp

    if _mp.current_process().name != "MainProcess":  # started by multiprocessing (named before it imports)
        from megatron_pz.logs.console import child_console as _child_console

        _child_console()
