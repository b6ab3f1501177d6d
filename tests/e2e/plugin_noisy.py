"""A reward plug-in that behaves like a noisy library, for the quiet-console test (test_quiet_console_e2e.py): its
import raises a UserWarning and a FutureWarning and draws a progress bar, as Megatron and transformers do. It is
imported while a run's config is read (rewards are resolved there), before the run's log file exists. Its reward is
``plugin_rewards.odd_length``'s."""
import warnings

from tqdm import tqdm

warnings.warn("plugin_noisy: a deliberate UserWarning at import", UserWarning)
warnings.warn("plugin_noisy: a deliberate FutureWarning at import", FutureWarning)
for _ in tqdm(range(3), desc="plugin_noisy bar"):
    pass


def odd_length(response: str, target: str, **info) -> float:
    return float(len(response) % 2)
