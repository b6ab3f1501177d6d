"""The one dtype table: config names (fp32/bf16/fp16), HF/SGLang names (float32/bfloat16/float16), torch dtypes.

Every ``--dtype`` flag and ``*_dtype`` config field accepts either spelling and resolves through here.
Importing it does not import torch (CLI ``--help`` stays fast); the torch dtypes are looked up on use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# short name -> (torch attribute = HF / SGLang name, bytes per element)
_TABLE: dict[str, tuple[str, int]] = {
    "fp32": ("float32", 4),
    "bf16": ("bfloat16", 2),
    "fp16": ("float16", 2),
}
SHORT_NAMES: tuple[str, ...] = tuple(_TABLE)
_LONG_TO_SHORT = {long: short for short, (long, _) in _TABLE.items()}


def short_name(name: str | torch.dtype) -> str:
    """'bf16' for 'bf16', 'bfloat16' or torch.bfloat16; ValueError naming the choices otherwise."""
    if not isinstance(name, str):  # a torch.dtype: "torch.bfloat16"
        key = str(name).replace("torch.", "")
        if key in _LONG_TO_SHORT:
            return _LONG_TO_SHORT[key]
        raise ValueError(f"unsupported dtype {name}; choose one of {', '.join(SHORT_NAMES)}")
    key = name.strip().lower()
    if key in _TABLE:
        return key
    if key in _LONG_TO_SHORT:
        return _LONG_TO_SHORT[key]
    raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(SHORT_NAMES)} "
                     f"(or {', '.join(_LONG_TO_SHORT)})")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    return getattr(torch, _TABLE[short_name(name)][0])


def long_name(name: str | torch.dtype) -> str:
    """The HF config / SGLang ``--dtype`` spelling: 'bfloat16' for 'bf16'."""
    return _TABLE[short_name(name)][0]


def nbytes(name: str | torch.dtype) -> int:
    return _TABLE[short_name(name)][1]
