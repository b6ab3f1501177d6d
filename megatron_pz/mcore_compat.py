"""Every difference between the Megatron-Core releases we support, in one place.

Supported: 0.16.1 (the newest release for Python 3.11) and 0.19.x (0.17 and later need Python >= 3.12);
``tools/install.sh`` picks one by interpreter. The rest of the package calls Megatron-Core's public API, which
is the same in both for everything we use (``get_forward_backward_func``, ``finalize_model_grads``, DDP and
optimizer configs, ``parallel_state``, ``ModuleSpec``s, ``TransformerConfig`` fields). What differs:

1. Where a ``torch_dist`` checkpoint keeps its non-sharded ("common") state: ``iteration``, ``args``,
   ``checkpoint_version``, the optimizer's param-group settings.
   * <= 0.16 writes it to ``common.pt`` (``torch.save``) and reads only that file;
   * >= 0.17 writes it as one ``ShardedObject`` named ``common_state`` inside the ``.distcp`` files (no
     ``common.pt``), and reads ``common.pt`` first when one exists.
   So that a checkpoint written under either loads under the other, a save under >= 0.17 also writes
   ``common.pt`` (``write_legacy_common``, the same dict), and a load under 0.16 falls back to the
   ``common_state`` object when ``common.pt`` is missing (``dist_load``, for checkpoints Megatron-LM wrote
   with 0.17+). ``read_common`` reads either layout with torch alone, for the architecture in ``args``.
2. MoE without Transformer Engine: 0.16's router reads ``moe_utils.te_general_gemm``, defined only when TE
   imports (a NameError in every MoE forward on CPU); 0.17+ defines it as None (``moe_without_te``).

Version checks are feature checks (does the attribute exist, is the file there), never version-number
comparisons, so a release between the two behaves as whichever side it resembles.
"""
from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any

import torch

COMMON_FILE = "common.pt"  # <= 0.16's file for the non-sharded state (still read first by 0.17+)
COMMON_OBJECT = "common_state"  # >= 0.17's ShardedObject key for the same state, inside the .distcp files


def version() -> str:
    """The installed Megatron-Core release, e.g. ``"0.19.2"``."""
    from megatron.core.package_info import __version__

    return __version__


def writes_common_file() -> bool:
    """Whether this Megatron-Core's ``dist_checkpointing.save`` writes ``common.pt`` itself (<= 0.16)."""
    from megatron.core.dist_checkpointing import serialization

    # 0.16's save takes a `common_strategy` (TorchCommonSaveStrategy writes common.pt); 0.17 dropped the argument.
    return "common_strategy" in inspect.signature(serialization.save).parameters


def _common_object_fqn() -> str:
    """The key torch.distributed.checkpoint stores the ``common_state`` object under (``common_state/shard_0_1``)."""
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject(COMMON_OBJECT, None, (1,), (0,)).unique_key


def has_common_object(iter_dir: str | Path) -> bool:
    """Whether the checkpoint's ``.metadata`` lists the ``common_state`` object (written by 0.17+)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(iter_dir)).read_metadata()
    except Exception:
        return False
    return _common_object_fqn() in md.state_dict_metadata


def has_common_state(iter_dir: str | Path) -> bool:
    """Whether the checkpoint has its non-sharded state in either layout (``common.pt`` or ``common_state``)."""
    return (Path(iter_dir) / COMMON_FILE).is_file() or has_common_object(iter_dir)


def common_source(iter_dir: str | Path) -> str:
    """Where ``read_common`` reads the common state of ``iter_dir`` from, for messages."""
    path = Path(iter_dir) / COMMON_FILE
    return str(path) if path.exists() else f"the {COMMON_OBJECT} object of {iter_dir}"


def _read_object_bytes(iter_dir: Path, fqn: str) -> bytes:
    """The pickled bytes of one object entry of a torch_dist checkpoint, *not* unpickled: torch's
    ``DefaultLoadPlanner.load_bytes`` would ``torch.load(weights_only=False)`` them, which we never do unasked."""
    import torch.distributed.checkpoint as dcp

    class _RawBytes(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            self.original_state_dict[read_item.dest_index.fqn] = value.read()  # the caller's dict (flat)

    box: dict[str, Any] = {fqn: io.BytesIO()}
    dcp.load(box, storage_reader=dcp.FileSystemReader(str(iter_dir)),
             planner=_RawBytes(flatten_state_dict=False), no_dist=True)
    return box[fqn]


def read_common(iter_dir: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """The non-sharded state of a ``torch_dist`` checkpoint written by any Megatron-Core: ``common.pt`` when present,
    else the ``common_state`` object of the ``.distcp`` files; {} when it has neither.

    ``weights_only=True`` (the default) refuses classes outside torch's allow-list (Megatron-Core registers
    ``argparse.Namespace`` and the other plain classes Megatron-LM stores); the error propagates to the caller.
    """
    import megatron.core  # noqa: F401  (registers Megatron's safe globals for weights_only loading)

    iter_dir = Path(iter_dir)
    path = iter_dir / COMMON_FILE
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    if not has_common_object(iter_dir):
        return {}
    raw = _read_object_bytes(iter_dir, _common_object_fqn())
    loaded = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=weights_only)
    # Saved as the data of a ShardedObject of global shape (1,): a one-element list.
    return loaded[0] if isinstance(loaded, list) else loaded


def write_legacy_common(iter_dir: str | Path) -> bool:
    """After a save under >= 0.17 (rank 0 only): also write the common state to ``common.pt``, so that 0.16 and
    Megatron-LM releases before 0.17 read the checkpoint. Returns True if it wrote the file. No-op under 0.16."""
    iter_dir = Path(iter_dir)
    if (iter_dir / COMMON_FILE).exists() or not has_common_object(iter_dir):
        return False
    torch.save(read_common(iter_dir, weights_only=False), iter_dir / COMMON_FILE)
    return True


def _common_load_strategy() -> Any | None:
    """Under 0.16: a common-state loader that also reads 0.17+ checkpoints (no ``common.pt``). None under 0.17+,
    whose ``dist_checkpointing.load`` reads both layouts itself."""
    if not writes_common_file():
        return None
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class _EitherLayout(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            if (Path(checkpoint_dir) / COMMON_FILE).exists():
                return super().load_common(checkpoint_dir)
            return read_common(checkpoint_dir)

    return _EitherLayout()


def dist_load(state: dict[str, Any], iter_dir: str | Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` that reads checkpoints from 0.16 and 0.17+ under either release.

    A checkpoint without ``common.pt`` has its common state checked with ``weights_only=True`` first: 0.17+ reads
    the ``common_state`` object through torch's default planner, which unpickles without an allow-list."""
    from megatron.core import dist_checkpointing

    if not (Path(iter_dir) / COMMON_FILE).exists():
        read_common(iter_dir)  # raises on classes outside the allow-list
    strategy = _common_load_strategy()
    if strategy is None:
        return dist_checkpointing.load(state, str(iter_dir))
    return dist_checkpointing.load(state, str(iter_dir), common_strategy=strategy)


def dist_save(state: dict[str, Any], iter_dir: str | Path) -> None:
    """``dist_checkpointing.save`` whose result has a ``common.pt`` under every release. Collective."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(iter_dir))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        write_legacy_common(iter_dir)


def moe_without_te() -> None:
    """0.16's router calls ``moe_utils.te_general_gemm``, defined only when Transformer Engine imports, so every MoE
    forward without TE dies with a NameError; None selects its plain ``torch.mm`` path (0.17+ sets None itself)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
