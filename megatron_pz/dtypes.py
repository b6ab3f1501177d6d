"""The one dtype table: config names (fp32/bf16/fp16), HF/SGLang names (float32/bfloat16/float16), torch dtypes.

Every ``--dtype`` flag and ``*_dtype`` config field accepts either spelling and resolves through here.
"""
from __future__ import annotations

import torch

# short name -> (torch dtype, HF / SGLang name, bytes per element)
_TABLE: dict[str, tuple[torch.dtype, str, int]] = {
    "fp32": (torch.float32, "float32", 4),
    "bf16": (torch.bfloat16, "bfloat16", 2),
    "fp16": (torch.float16, "float16", 2),
}
SHORT_NAMES: tuple[str, ...] = tuple(_TABLE)
_LONG_TO_SHORT = {long: short for short, (_, long, _) in _TABLE.items()}


def short_name(name: str | torch.dtype) -> str:
    """'bf16' for 'bf16', 'bfloat16' or torch.bfloat16; ValueError naming the choices otherwise."""
    if isinstance(name, torch.dtype):
        for short, (dt, _, _) in _TABLE.items():
            if dt == name:
                return short
        raise ValueError(f"unsupported dtype {name}; choose one of {', '.join(SHORT_NAMES)}")
    key = str(name).strip().lower()
    if key in _TABLE:
        return key
    if key in _LONG_TO_SHORT:
        return _LONG_TO_SHORT[key]
    raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(SHORT_NAMES)} "
                     f"(or {', '.join(_LONG_TO_SHORT)})")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    return _TABLE[short_name(name)][0]


def long_name(name: str | torch.dtype) -> str:
    """The HF config / SGLang ``--dtype`` spelling: 'bfloat16' for 'bf16'."""
    return _TABLE[short_name(name)][1]


def nbytes(name: str | torch.dtype) -> int:
    return _TABLE[short_name(name)][2]
