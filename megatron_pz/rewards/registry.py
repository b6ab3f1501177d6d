"""Reward registry: names and dotted import paths -> reward callables.

A reward function has the signature ``fn(response: str, target: str, **info) -> float``:
  * ``response`` is the full generated text (the function extracts its own answer, e.g. the last ``\\boxed{}``);
  * ``target`` is ``Sample.metadata["target"]``;
  * ``info`` is the rest of ``Sample.metadata`` (e.g. ``gt_token_byte_ends`` for RPT); accept ``**info`` and
    ignore what you do not need.

A plug-in is any such function importable by path: ``get_reward("my_pkg.rewards:fuzzy")`` or
``get_reward("my_pkg.rewards.fuzzy")``; no change to the trainer is needed.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from megatron_pz.errors import ConfigError

RewardFn = Callable[..., float]

# Built-ins are stored as paths and imported on first use (no import cycle between registry and rewards).
_BUILTIN: dict[str, str] = {
    "exact_match": "megatron_pz.rewards.span:exact_match",
    "exact_match_lenient": "megatron_pz.rewards.span:exact_match_lenient",
    "continuation_match": "megatron_pz.rewards.span:continuation_match",
    "brevity": "megatron_pz.rewards.format:brevity",
    "format_boxed": "megatron_pz.rewards.format:format_boxed",
    "rpt_prefix": "megatron_pz.rewards.rpt:rpt_prefix",
}
_REGISTERED: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Register ``fn`` under ``name`` at run time (overrides a built-in of the same name)."""
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {fn!r} is not callable")
    _REGISTERED[name] = fn


def available_rewards() -> list[str]:
    """Names usable without a dotted path."""
    return sorted({*_BUILTIN, *_REGISTERED})


def import_by_path(path: str) -> Any:
    """Import ``"pkg.module:attr"`` or ``"pkg.module.attr"`` (attr may be dotted after ':')."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"reward {path!r}: expected 'pkg.module:function' or 'pkg.module.function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward {path!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}") from exc
    return obj


def get_reward(name: str) -> RewardFn:
    """Resolve a reward by registered name, built-in name or dotted path; ConfigError when unknown."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"reward name {name!r}: expected a non-empty string")
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return import_by_path(_BUILTIN[name])
    if "." not in name and ":" not in name:
        raise ConfigError(f"unknown reward {name!r}: expected one of {available_rewards()} or a dotted path")
    fn = import_by_path(name)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {fn!r} is not callable")
    return fn
