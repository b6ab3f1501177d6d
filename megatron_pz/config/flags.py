"""Megatron-LM's command-line habits accepted by ``megatron-pz train`` (``--load``, ``--lr``, ...), each one the
``key=value`` override of one config key."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_pz.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """A Megatron-LM command-line habit that sets one config key (``megatron-pz train --load CKPT``)."""

    key: str
    names: tuple[str, ...]
    help: str
    metavar: str
    text: bool = False  # a path: taken verbatim, never read as a YAML number / null / bool

    @property
    def dest(self) -> str:
        return "flag_" + self.key.replace(".", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("policy.load", ("--load",), "initial weights: a Megatron checkpoint (Megatron-LM's or ours, root or "
         "iter_NNNNNNN), a training run folder, an HF model folder, or smollm2", "CKPT", text=True),
    Flag("policy.tokenizer", ("--tokenizer", "--tokenizer-model"), "HF tokenizer folder or SentencePiece .model "
         "file; needed when the checkpoint carries no tokenizer (Megatron-LM checkpoints)", "DIR", text=True),
    Flag("output_dir", ("--save",), "the run's output folder; checkpoints go to DIR/checkpoints and the same "
         "command resumes from there", "DIR", text=True),
    Flag("train.seed", ("--seed",), "sampling, span and data-order seed", "N"),
    Flag("train.steps", ("--train-iters",), "number of training steps", "N"),
    Flag("optim.lr", ("--lr",), "peak learning rate, e.g. 1e-6", "LR"),
)
"""Megatron-LM's flags accepted by ``megatron-pz train``; each is the override ``KEY=VALUE`` of its key."""


def flag_overrides(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """The ``FLAGS`` given (``values``: parsed arguments by ``Flag.dest``) as ``key=value`` overrides; a key also
    set by a ``key=value`` override is refused rather than silently resolved one way."""
    given = {item.split("=", 1)[0].strip() for item in overrides}
    out = []
    for flag in FLAGS:
        value = values.get(flag.dest)
        if value is None:
            continue
        if flag.key in given:
            raise ConfigError(f"{flag.key} is set twice, by {flag.names[0]} and by {flag.key}=...; keep one")
        out.append(f"{flag.key}={json.dumps(value) if flag.text else value}")
    return out
