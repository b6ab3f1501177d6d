"""Read and write Hugging Face model folders (config.json + safetensors shards), safely and atomically.

Reading is lazy (``safe_open``): a rank fetches only the tensors it needs. ``pytorch_model*.bin`` folders
are read with ``torch.load(weights_only=True)``, never with pickle. Writing goes to a temporary sibling
folder that is renamed into place last (``megatron_pz.io.atomic_dir``), so an interrupted export never leaves a
half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch

from megatron_pz.errors import CheckpointError
from megatron_pz.io import atomic_dir

# Files of an HF folder that are not weights: copied along with conversions (tokenizer, generation config).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json"}


class HFCheckpoint:
    """Lazy tensor access to an HF model folder. ``get(name)`` names the file on any failure."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"HF model folder not found: {self.folder}")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        index = self.folder / "model.safetensors.index.json"
        bin_index = self.folder / "pytorch_model.bin.index.json"
        if index.exists() or bin_index.exists():
            idx_path = index if index.exists() else bin_index
            try:
                weight_map = json.loads(idx_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{idx_path} is not a valid shard index: {exc}") from None
            for name, fname in weight_map.items():
                self._where[name] = self.folder / fname
            for f in sorted(set(self._where.values())):
                if not f.exists():
                    raise CheckpointError(f"missing checkpoint shard {f} (listed in {idx_path.name})")
        elif (self.folder / "model.safetensors").exists():
            self._index_file(self.folder / "model.safetensors")
        elif (self.folder / "pytorch_model.bin").exists():
            self._index_file(self.folder / "pytorch_model.bin")
        else:
            raise CheckpointError(f"no model.safetensors(.index.json) or pytorch_model.bin in {self.folder}")

    def _open(self, path: Path):
        if path.suffix == ".bin":
            if path not in self._bin_cache:
                try:
                    self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise CheckpointError(f"cannot read {path} (weights_only=True): {exc}") from None
            return self._bin_cache[path]
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # header/size errors of a truncated or corrupt file
                raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): "
                                      f"{exc}") from None
        return self._handles[path]

    def _index_file(self, path: Path) -> None:
        h = self._open(path)
        for name in h.keys():
            self._where[name] = path

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} is missing from the HF checkpoint {self.folder}")
        h = self._open(path)
        try:
            return h[name] if isinstance(h, dict) else h.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {path} (truncated?): {exc}") from None

    def config(self) -> dict:
        path = self.folder / "config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"missing {path}") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None

    def first_dtype(self) -> torch.dtype:
        name = next(iter(self._where))
        return self.get(name).dtype


def aux_files(folder: str | os.PathLike) -> list[Path]:
    """Non-weight files of an HF folder (tokenizer, generation config, ...), to carry along."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.name not in _SKIP_FILES and not p.name.endswith(_WEIGHT_SUFFIXES):
            out.append(p)
    return out


def write_safetensors_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                             max_shard_bytes: int = 5 * 1024**3, prefix: str = "model") -> dict[str, str]:
    """Write tensors into ``prefix-0000k-of-0000n.safetensors`` files; returns the weight map."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    return weight_map


def save_hf_folder(dst: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], config: dict,
                   copy_from: Iterable[Path] = (), max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write an HF model folder atomically: safetensors shards, index, config.json, extra files."""
    with atomic_dir(dst) as tmp:
        weight_map = write_safetensors_shards(tmp, tensors, max_shard_bytes)
        if len(set(weight_map.values())) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in copy_from:
            shutil.copy2(f, tmp / f.name)
    return Path(dst)
