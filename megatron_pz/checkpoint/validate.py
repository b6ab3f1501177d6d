"""Checks run before a collective load: every shard file whole, every model tensor present with its shape.

Both name the offending file or tensor, so a bad checkpoint fails with one clear message on every rank
instead of an opaque gloo/NCCL error on a peer halfway through ``dist_checkpointing.load``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_pz.errors import CheckpointError

# Vocab-sized tensors: [padded_vocab, hidden]. Their padding depends on TP and make_vocab_size_divisible_by,
# so a checkpoint saved at another TP size differs in dim 0 only (the loader re-pads them).
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def validate_files(iter_dir: Path) -> None:
    """Every byte range the checkpoint's ``.metadata`` lists must exist: names a missing/truncated file.

    Cheap (stat calls only) and catches interrupted copies before ranks start a collective load that
    would otherwise die with an opaque gloo/NCCL error on a peer.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(iter_dir)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"cannot read {iter_dir / '.metadata'}: {exc}") from None
    need: dict[str, int] = {}
    owner: dict[str, str] = {}
    for index, info in md.storage_data.items():
        end = info.offset + info.length
        if end > need.get(info.relative_path, -1):
            need[info.relative_path], owner[info.relative_path] = end, index.fqn
    for rel, end in sorted(need.items()):
        f = iter_dir / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint shard file {f} is missing (it holds {owner[rel]!r} and more)")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(f"checkpoint shard file {f} is truncated: {size} bytes, the metadata needs "
                                  f"{end} (tensor {owner[rel]!r})")


def validate_shapes(iter_dir: Path, sharded: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Compare global shapes of the model's sharded tensors with the checkpoint's metadata.

    Returns {key: checkpoint_shape} for the vocab-sized tensors whose padding differs (handled by the
    caller); raises CheckpointError naming the first other mismatch or missing key.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    try:
        ckpt_meta = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    except Exception as exc:
        raise CheckpointError(f"cannot read tensor metadata of {iter_dir}: {exc}") from None
    vocab_mismatch: dict[str, tuple[int, ...]] = {}
    for st in nested_values(sharded):
        if not isinstance(st, ShardedTensor):
            continue
        if st.key not in ckpt_meta:
            raise CheckpointError(f"checkpoint {iter_dir} has no tensor {st.key!r} that the model needs "
                                  f"(different architecture?)")
        have = tuple(ckpt_meta[st.key].global_shape)
        want = tuple(st.global_shape)
        if have != want:
            if st.key in VOCAB_KEYS and have[1:] == want[1:]:
                vocab_mismatch[st.key] = have
                continue
            raise CheckpointError(f"shape mismatch for {st.key} in {iter_dir}: checkpoint {have}, "
                                  f"model {want}")
    return vocab_mismatch
