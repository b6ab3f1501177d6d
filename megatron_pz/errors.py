"""Exception types shared by all modules.

``UserError`` (and subclasses) mean: the user's input is wrong (a config value, a path, a checkpoint file, a
corpus line). The CLI prints them as one line naming the culprit, without a traceback. Anything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user; the message must name the offending key, file or value."""


class ConfigError(UserError):
    """A config value is invalid or inconsistent (e.g. heads not divisible by TP)."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, or does not match the model (names the file/key)."""


class DataError(UserError):
    """A corpus file or line is malformed (names the file and line number)."""


class TrainingError(UserError):
    """The run cannot go on as configured (e.g. ``train.max_nonfinite_steps`` NaN/Inf steps in a row); the message
    says which steps and what to change. Its checkpoints are intact."""


class RolloutError(Exception):
    """The rollout engine failed (unreachable server, garbage response, timeout after retries)."""
