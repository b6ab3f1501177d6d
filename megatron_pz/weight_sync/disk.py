"""Disk weight sync: one HF safetensors folder per version on a shared filesystem, then /update_weights_from_disk.

Shards are written into ``<weights_dir>/.v<version>.tmp<pid>`` and renamed to ``v<version>`` in one step
(``megatron_pz.io.atomic_replace``), so the engine, and a resumed run, sees either no folder or a complete one.
For the embedded server and debugging; slime's ``update_weight_from_disk.py``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from megatron_pz.errors import UserError
from megatron_pz.io import atomic_replace
from megatron_pz.rollout.updater import WeightUpdater
from megatron_pz.weight_sync.base import DEFAULT_BUCKET_BYTES, NamedTensors, SyncReport, VersionedSync, iter_buckets

logger = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^v(\d{8})$")
_TMP_DIR = re.compile(r"^\.v\d{8}\.tmp\d+$")
# Files copied next to the weights so that the folder is a complete HF model (SGLang reads config.json).
_HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def version_dir_name(version: int) -> str:
    """``v00000007``: the folder of one weight version below ``weights_dir``."""
    return f"v{version:08d}"


class DiskWeightSync(VersionedSync):
    """Write an HF safetensors folder per version under a shared directory and tell the engine to load it.

    ``weights_dir`` must be visible at the same path to the servers (a shared filesystem on a cluster) and, for
    the embedded server, lie below its ``--weights-dir``. ``hf_config_dir`` (config.json, tokenizer files) is
    copied next to the shards so every version folder is a complete HF model. The ``keep_last`` newest versions
    are kept on disk. ``engine`` may be None for a writer that never pushes (``write``, ``drop_versions_after``).
    """

    def __init__(self, engine: WeightUpdater | None, weights_dir: str | Path, hf_config_dir: str | Path | None = None,
                 shard_bytes: int = DEFAULT_BUCKET_BYTES, keep_last: int = 2, current_version: int | None = None):
        super().__init__(current_version)
        self.engine = engine
        self.weights_dir = Path(weights_dir)
        self.hf_config_dir = Path(hf_config_dir) if hf_config_dir else None
        self.shard_bytes = shard_bytes
        self.keep_last = keep_last

    def write(self, named: NamedTensors, version: int) -> tuple[Path, int, int, int, int]:
        """Write version ``version`` atomically; returns (folder, tensors, bytes, shards, parameters)."""
        from safetensors.torch import save_file

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        final = self.weights_dir / version_dir_name(version)
        if final.exists():
            raise UserError(f"{final} already exists: version {version} was written before")
        tmp = self.weights_dir / f".{version_dir_name(version)}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weight_map: dict[str, str] = {}
        n_tensors = n_bytes = n_params = shards = 0
        try:
            for shards, bucket in enumerate(iter_buckets(named, self.shard_bytes), start=1):
                fname = f"model-{shards:05d}.safetensors"
                tensors = {}
                for name, t in bucket:
                    if name in weight_map or name in tensors:
                        raise UserError(f"tensor {name!r} was given twice")
                    tensors[name] = t.detach().to("cpu").contiguous()
                    n_bytes += t.numel() * t.element_size()
                    n_params += t.numel()
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in tensors})
                n_tensors += len(tensors)
            if not weight_map:
                raise UserError("no tensors to write")
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": n_bytes}, "weight_map": weight_map}, indent=1))
            if self.hf_config_dir:
                for side in _HF_SIDE_FILES:
                    if (self.hf_config_dir / side).is_file():
                        shutil.copy2(self.hf_config_dir / side, tmp / side)
            atomic_replace(tmp, final)  # readers see either no folder or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, n_tensors, n_bytes, shards, n_params

    def push(self, named: NamedTensors, version: int) -> SyncReport:
        self.check_version(version)
        if self.engine is None:
            raise UserError("DiskWeightSync.push needs an engine (this one only writes)")
        t0 = time.perf_counter()
        path, n_tensors, n_bytes, shards, n_params = self.write(named, version)
        self.engine.update_weights_from_disk(str(path), version)
        self.version = version
        self.prune(keep=path)
        report = SyncReport(version, time.perf_counter() - t0, n_tensors, n_bytes, shards, n_params, str(path))
        logger.info("disk weight sync v%d: %d tensors, %.1f MB in %.2fs", version, n_tensors, n_bytes / 1e6,
                    report.seconds)
        return report

    def drop_versions_after(self, version: int) -> list[str]:
        """Remove version folders above ``version`` and temporary folders of any writer: what a run that died
        after a weight sync but before its checkpoint left behind. The resumed run, restarting from the checkpoint
        at ``version``, writes those versions again (with other weights). Returns the names removed."""
        if not self.weights_dir.is_dir():
            return []
        removed = []
        for p in sorted(self.weights_dir.iterdir()):
            m = _VERSION_DIR.match(p.name)
            if (m and int(m.group(1)) > version) or _TMP_DIR.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def prune(self, keep: Path) -> None:
        """Delete all but the ``keep_last`` newest version folders (never ``keep``, the one just pushed)."""
        versions = sorted(p for p in self.weights_dir.iterdir() if _VERSION_DIR.match(p.name))
        for old in versions[:-self.keep_last] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
