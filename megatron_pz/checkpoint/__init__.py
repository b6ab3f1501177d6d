"""Megatron checkpoints in Megatron-LM's layout: ``ROOT/latest_checkpointed_iteration.txt`` + ``ROOT/iter_NNNNNNN/``.

The mechanics of the folder, not what a run stores in it (that is the trainer's checkpointer):

* ``layout``: tracker file, iteration folders, ``resolve`` / ``read_arch`` / Megatron-LM ``args``;
* ``sharded``: collective ``save`` / ``load`` of model chunks, optimizer and extra sharded state through
  ``megatron.core.dist_checkpointing`` (``torch_dist``, reshards on load), written atomically; ``publish``
  for a save written with ``publish_now=False``;
* ``background``: at most one save whose shards are written in a forked process (Megatron's async save),
  published (rename + tracker) only once every rank's write is durable;
* ``vocab``: the true (unpadded) vocabulary of a Megatron-LM checkpoint;
* ``validate``: shard files whole and tensor shapes right before a collective load starts;
* ``optimizer_state``: making Megatron's DistributedOptimizer state loadable without Apex / TE.
"""
from megatron_pz.checkpoint.layout import (CHECKPOINT_VERSION, HF_AUX_DIR, META, RUN_CHECKPOINT_DIR, RUN_HF_META_DIR,
                                           TRACKER, CheckpointInfo, is_megatron_checkpoint, iter_dir_name, load_common,
                                           megatron_lm_args, read_arch, resolve, tokenizer_path)
from megatron_pz.checkpoint.vocab import true_vocab_size
from megatron_pz.checkpoint.background import BackgroundSaves
from megatron_pz.checkpoint.optimizer_state import materialise_optimizer_state, unshare_adam_steps
from megatron_pz.checkpoint.sharded import OPTIM_SHARDING, load, model_sharded_state_dict, publish, save
from megatron_pz.checkpoint.validate import VOCAB_KEYS, validate_files, validate_shapes

__all__ = [
    "CHECKPOINT_VERSION", "HF_AUX_DIR", "META", "OPTIM_SHARDING", "RUN_CHECKPOINT_DIR", "RUN_HF_META_DIR", "TRACKER",
    "VOCAB_KEYS", "BackgroundSaves", "CheckpointInfo",
    "is_megatron_checkpoint", "iter_dir_name", "load", "load_common", "materialise_optimizer_state",
    "megatron_lm_args", "model_sharded_state_dict", "publish", "read_arch", "resolve", "save", "tokenizer_path",
    "true_vocab_size", "unshare_adam_steps",
    "validate_files", "validate_shapes",
]
