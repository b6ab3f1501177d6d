"""Reading and validating a complete weight state before the engine swaps it in (disk and distributed updates).

A new state is checked in full (every name, shape, dtype kind, finiteness) before a single model tensor is
touched, so a bad checkpoint never leaves a half-updated model. Distributed updates arrive in buckets; they are
staged here until every model tensor of one version has arrived.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_pz.errors import CheckpointError

logger = logging.getLogger(__name__)


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of an HF safetensors folder (sharded or not) into CPU memory.

    Raises CheckpointError naming the folder/file on a missing folder, no shards, a shard listed in the index
    but absent, a corrupt or truncated file, or a tensor name present in two shards.
    """
    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"weights folder {root} does not exist or is not a directory")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing[:5]}")
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {root}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name in tensors:
                        raise CheckpointError(f"tensor {name!r} appears in more than one shard ({file})")
                    tensors[name] = reader.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ValueError...
            raise CheckpointError(f"cannot read {file}: {type(exc).__name__}: {exc} (corrupt or truncated?)") from None
    return tensors


@dataclass(frozen=True)
class ParamSpec:
    """What the model expects of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class StateSpec:
    """The model's tensors, and its alias groups (tied weights share storage, e.g. lm_head/embeddings)."""

    params: dict[str, ParamSpec]
    aliases: dict[str, list[str]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> StateSpec:
        state = model.state_dict()
        params = {name: ParamSpec(tuple(t.shape), t.dtype) for name, t in state.items()}
        by_storage: dict[int, list[str]] = {}
        for name, t in state.items():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
        aliases = {name: group for group in by_storage.values() if len(group) > 1 for name in group}
        return cls(params, aliases)

    def covered_by(self, names: Mapping[str, object]) -> bool:
        """Every model tensor present in ``names``, itself or through a tied alias."""
        return all(n in names or any(a in names for a in self.aliases.get(n, [])) for n in self.params)


def validate_state(tensors: Mapping[str, torch.Tensor], spec: StateSpec, source: str) -> dict[str, torch.Tensor]:
    """Check a complete new state against the model and return it cast to the model's dtypes.

    Every model tensor must be present (a tied alias may stand in for its partner), no unknown name may appear,
    shapes must match exactly and values must be finite. Errors name ``source`` and the tensor.
    """
    unexpected = sorted(set(tensors) - set(spec.params))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors not in the model: {unexpected[:5]}"
                              + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    missing = [n for n in spec.params if n not in tensors and not any(a in tensors for a in spec.aliases.get(n, []))]
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {missing[:5]}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    out: dict[str, torch.Tensor] = {}
    for name, want in spec.params.items():
        t = tensors.get(name)
        if t is None:
            t = next(tensors[a] for a in spec.aliases[name] if a in tensors)
        if tuple(t.shape) != want.shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, model expects {want.shape}")
        if t.dtype.is_floating_point != want.dtype.is_floating_point:
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {t.dtype}, model expects {want.dtype}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {name!r} contains NaN or Inf")
        out[name] = t.to(want.dtype)
    return out


@dataclass
class StagedUpdate:
    """Buckets of one distributed update, held until the version is complete.

    SGLang loads each bucket immediately (the sender pauses generation around the transfer); the embedded engine
    stages buckets and swaps all at once, so no generation ever sees a partially updated model.
    """

    spec: StateSpec
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int | None = None

    def start(self, version: int) -> None:
        """Begin ``version``, dropping what is staged of another (an incomplete update the sender gave up on)."""
        if self.version == version:
            return
        if self.tensors:
            logger.warning("dropping %d staged tensors of incomplete version %s", len(self.tensors), self.version)
        self.tensors, self.version = {}, version

    def add(self, received: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """Stage one bucket; return the complete state (and clear the stage) once every tensor has arrived."""
        for name, t in received:
            if name not in self.spec.params:
                version = self.version
                self.clear()
                raise CheckpointError(f"distributed update v{version}: unexpected tensor {name!r}")
            self.tensors[name] = t
        if not self.spec.covered_by(self.tensors):
            return None
        complete = self.tensors
        self.clear()
        return complete

    def clear(self) -> None:
        self.tensors, self.version = {}, None
