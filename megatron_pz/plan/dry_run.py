"""Dry-run validation of a run config for a world size, on CPU in seconds, before a job queues.

    megatron-pz plan --config examples/qwen3_4b_pretrainzero.yaml --world-size 8 [--model qwen3-4b]

Checks, in order (each prints one line; the first failure decides the verdict, later checks still run where
they can): the config loads; the world splits into TP x PP x CP x DP and DP divides the batch; the model
architecture (read without weights); the architecture splits at this TP/PP/CP/EP; prompt + response fit the
context; Megatron accepts the TransformerConfig; Megatron's parallel_state builds every process group on a
fake N-rank world (torch's "fake" backend: no processes, no communication); the planner's memory per GPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_pz.errors import UserError
from megatron_pz.plan.archs import microbatch_shape, resolve_arch, samples_per_dp_rank, score_keys, seq_length_of
from megatron_pz.plan.layout import Layout, Workload
from megatron_pz.plan.memory import MemoryPlan, plan_memory

# An H100 80GB: nvidia-smi reports 81,559 MiB = 79.6 GiB.
H100_GIB = 79.6


@dataclass
class Check:
    name: str
    ok: bool | None  # None = skipped
    detail: str


@dataclass
class Report:
    checks: list[Check]
    plan: MemoryPlan | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def text(self) -> str:
        tag = {True: "ok  ", False: "FAIL", None: "skip"}
        lines = [f"  {tag[c.ok]}  {c.name:<15} {c.detail}" for c in self.checks]
        return "\n".join(lines + [f"VERDICT: {'OK' if self.ok else 'FAIL'}"])


def _run(checks: list[Check], name: str, fn: Callable[[], str]) -> bool:
    try:
        checks.append(Check(name, True, fn()))
        return True
    except UserError as exc:
        checks.append(Check(name, False, str(exc)))
    except Exception as exc:  # Megatron's own checks raise AssertionError/ValueError/RuntimeError
        checks.append(Check(name, False, f"{type(exc).__name__}: {exc}"))
    return False


def host_memory_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f}
    return info.get("MemAvailable", info["MemTotal"]) / 1024 ** 2


def gpu_memory_gib() -> float | None:
    """This machine's GPU memory (the pre-flight runs on a node of the job), None without CUDA."""
    from megatron_pz import device

    if not device.cuda_available():
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 1024 ** 3


def validate(config: str, overrides: list[str], world_size: int, model: str | None = None,
             target: str | None = None, memory_gib: float | None = None, overhead_gib: float | None = None,
             fake_groups: bool = True) -> Report:
    """Run every check; ``target`` gpu|cpu (default: gpu for 16-bit configs), ``memory_gib`` per rank."""
    from megatron_pz.config import load_config

    checks: list[Check] = []
    box: dict[str, Any] = {}

    def load() -> str:
        box["cfg"] = load_config(config, overrides)
        return f"{config} ({box['cfg'].name})"

    if not _run(checks, "config", load):
        return Report(checks)
    cfg = box["cfg"]
    p = cfg.parallel
    target = target or ("cpu" if cfg.model.dtype == "fp32" else "gpu")

    def world() -> str:
        box["dp"] = cfg.validate_world(world_size)
        return (f"{world_size} = TP{p.tensor_model_parallel_size} x PP{p.pipeline_model_parallel_size} x "
                f"CP{p.context_parallel_size} x DP{box['dp']}; {cfg.train.paragraphs_per_step} paragraphs per step")

    _run(checks, "world", world)

    def arch() -> str:
        box["arch"] = a = resolve_arch(model or cfg.policy.load, vocab_size=cfg.policy.vocab_size,
                                       allow_pickle=cfg.policy.allow_pickle)
        moe = f", {a.num_experts} experts top-{a.moe_router_topk}" if getattr(a, "num_experts", None) else ""
        return (f"{a.family}: {a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} heads / "
                f"{a.num_query_groups} KV{moe}; {a.num_parameters / 1e9:.2f}B params (from {model or cfg.policy.load})")

    if not _run(checks, "model", arch):
        return Report(checks)
    a = box["arch"]
    _run(checks, "parallel split", lambda: (a.validate_parallel(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
        p.expert_model_parallel_size, p.expert_tensor_parallel_size), "heads, KV groups, FFN, layers, experts "
        "divide")[1])

    def lengths() -> str:
        from megatron_pz.trainer.setup import validate_lengths

        validate_lengths(cfg, a)
        return f"{seq_length_of(cfg)} tokens (prompt + longest response) <= {a.max_position_embeddings}"

    _run(checks, "lengths", lengths)
    _run(checks, "megatron config", lambda: _transformer_config(a, cfg, target))
    if fake_groups and "dp" in box:
        _run(checks, "process groups", lambda: _fake_groups(cfg, world_size))
    else:
        checks.append(Check("process groups", None, "skipped"))
    if "dp" not in box:
        return Report(checks)
    dp = box["dp"]
    mbs = cfg.train.micro_batch_size
    nmb = math.ceil(samples_per_dp_rank(cfg, dp) / mbs)
    if cfg.train.max_tokens_per_microbatch:  # packed rows: about every sample at its length cap, packed full
        nmb = math.ceil(samples_per_dp_rank(cfg, dp) * seq_length_of(cfg) / cfg.train.max_tokens_per_microbatch)
    rc = cfg.model.recompute_granularity
    layout = Layout(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, dp=dp,
                    cp=p.context_parallel_size, ep=p.expert_model_parallel_size,
                    etp=p.expert_tensor_parallel_size, sequence_parallel=p.sequence_parallel)
    te = target == "gpu" and cfg.model.transformer_impl != "local"  # as _transformer_config assumes
    rows, seq = microbatch_shape(cfg, cfg.shared_prompt_on(te))  # shared-prompt rows: fewer, longer
    keys = score_keys(cfg, cfg.shared_prompt_on(te), cfg.row_attention_on(te) == "segments")
    work = Workload(micro_batch_size=rows, seq_length=seq, num_microbatches=nmb, score_keys=keys,
                    dtype=cfg.model.dtype, distributed_optimizer=cfg.optim.use_distributed_optimizer,
                    # rows with their own mask (shared-prompt, packed) take TE's unfused attention: scores kept
                    recompute=rc, flash_attention=target == "gpu" and not cfg.masked_rows_on(te),
                    fused_swiglu=target == "gpu")
    if overhead_gib is None:
        overhead_gib = 4.0 if target == "gpu" else 0.5
    plan = plan_memory(a, layout, work, overhead_gib=overhead_gib)
    if memory_gib is None:
        memory_gib = (gpu_memory_gib() or H100_GIB) if target == "gpu" else host_memory_gib() / world_size
    fit = plan.fits(memory_gib)
    note = ""
    if rc == "full" and (cfg.model.recompute_num_layers or 1) != 1:
        note = " (planned as recompute_num_layers=1)"
    if (rows, seq) != (mbs, seq_length_of(cfg)):
        note += (f"; {'packed' if cfg.train.max_tokens_per_microbatch else 'shared-prompt'} rows: {rows} x {seq} "
                 f"tokens instead of {mbs} x {seq_length_of(cfg)} (longest micro-batch)")
    checks.append(Check("memory", bool(fit), f"{fit.reason}; {nmb} micro-batches of {mbs} per DP rank{note}"))
    return Report(checks, plan)


def _transformer_config(arch: Any, cfg: Any, target: str) -> str:
    """Megatron's TransformerConfig checks, as on the target (Transformer Engine assumed present on GPU)."""
    from unittest import mock

    from megatron_pz.model import provider

    if target != "gpu":
        provider.build_transformer_config(arch, cfg.model, cfg.parallel, masked_rows=cfg.masked_rows_on(False))
        return "TransformerConfig accepted"
    with mock.patch.object(provider, "use_transformer_engine", lambda _c: cfg.model.transformer_impl != "local"):
        provider.build_transformer_config(arch, cfg.model, cfg.parallel,
                                          masked_rows=cfg.masked_rows_on(cfg.model.transformer_impl != "local"))
    return "TransformerConfig accepted (GPU target: Transformer Engine assumed)"


def _fake_groups(cfg: Any, world_size: int) -> str:
    """Megatron's initialize_model_parallel on a fake world: every group it would create, no processes."""
    import torch

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:
        return "skipped (this torch has no fake process-group backend)"
    from megatron.core import parallel_state as ps

    from megatron_pz import device

    if torch.distributed.is_initialized():
        return "skipped (a process group already exists in this process)"
    device.install()
    p = cfg.parallel
    torch.distributed.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size, expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size, create_gloo_process_groups=False)
        dp, edp = ps.get_data_parallel_world_size(), ps.get_expert_data_parallel_world_size()
        return f"Megatron parallel_state on a fake {world_size}-rank world: DP {dp}, expert-DP {edp}"
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
