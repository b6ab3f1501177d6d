"""The ``rollout`` section: where rollouts come from, how each task samples, and how weights reach the servers."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_pz import dtypes
from megatron_pz.errors import ConfigError


@dataclass
class RolloutConfig:
    """Where rollouts come from and how each task samples [INFERENCE method §6 item 3: T=1, top-p 1]."""

    # embedded: start `megatron-pz serve-rollout` on this node (CPU or a single GPU without SGLang);
    # sglang: use running SGLang servers (urls, or an endpoints file written by the launcher).
    backend: str = "embedded"
    urls: list[str] = field(default_factory=list)
    endpoints_file: str | None = None
    # An sglang-router in front of the servers: generation goes through it (weight updates still go to
    # each server in `urls` / the endpoints file).
    router_url: str | None = None
    # Sent as `Authorization: Bearer` (and given to the embedded server this trainer starts); null = the
    # MEGATRON_PZ_ROLLOUT_API_KEY environment variable, which keeps the key off command lines.
    api_key: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 3
    # backend=embedded: a rollout server this trainer launched that dies (after the client's retries) is started
    # again from the current weight version and the step's rollout (or weight sync) is retried, at most this many
    # times per process; 0 = stop with exit status 3 as for external servers, which are never restarted.
    max_engine_restarts: int = 3
    # Rollout/train overlap: 0 = on-policy (each step's rollout, then its update). >= 1: the next step's rollout is
    # generated on a background thread while this step trains (one batch in flight), with the weights of this
    # step, so its samples are 1 weight version old when trained; the importance weight (loss.mismatch) corrects
    # for it. A batch older than this bound (a run resumed with a smaller value) is generated again from its
    # paragraphs with the current weights. Needs a separate rollout server (rollout.colocate=false).
    max_staleness: int = 0
    max_concurrency_per_server: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # Seed every sample, from (train.seed, step, DP rank, task, prompt, sample) (rollout/seeds.py): a rerun or a
    # resumed step sends the same seeds, so an engine that is deterministic for a given seed repeats its responses
    # (the embedded engine at a fixed thread count; SGLang only with its deterministic-inference settings;
    # docs/training.md). Costs nothing on the embedded engine, which seeds each row of a batch on its own.
    reproducible: bool = True
    # Separate response caps for the two tasks; null = train.max_response_tokens.
    gen_max_new_tokens: int | None = None
    pred_max_new_tokens: int | None = None
    # Colocated rollout (backend=embedded): the embedded engine runs inside global rank 0's trainer process, no
    # server process. World size 1: its model's parameters are views of the trainer's own (one copy of the
    # weights; q/k/v, which Megatron fuses group-interleaved, are re-materialised at each sync) and a weight sync
    # is a version bump. World size > 1 (TP, PP, DP): the engine keeps its own full copy on rank 0 and a sync
    # copies the gathered tensors into it in memory. Nothing is written to disk either way; every data owner
    # reaches rank 0's server over HTTP. Needs rollout.embedded_dtype = model.dtype. false: a separate server
    # process, disk weight sync.
    colocate: bool = False
    # backend=sglang with servers on the trainer's GPUs (started with --enable-memory-saver): global rank 0 asks
    # them to free their weights, KV cache and CUDA graphs for the train phase, then to take back their weights'
    # memory before the weight sync and the rest after it (SGLang's /release_memory_occupation and
    # /resume_memory_occupation).
    release_memory_in_train: bool = False
    # disk (embedded / shared filesystem) | distributed (NCCL broadcast to SGLang) | tensor (colocated IPC)
    weight_sync: str = "disk"
    # Folder for disk weight sync (the embedded server only reads below it); null = <output_dir>/weights.
    weights_dir: str | None = None
    bucket_mb: int = 512
    # distributed sync: tensor-parallel size of each SGLang server (the broadcast group has 1 + sum(TP) ranks),
    # the address the servers use to reach global rank 0 (null = this host's name), and the group backend
    # (nccl on GPU; gloo lets the embedded server join on CPU).
    server_tp_size: int = 1
    weight_sync_master_address: str | None = None
    weight_sync_backend: str = "nccl"
    # The embedded server's own compute dtype (its `serve-rollout --dtype`), and the maximum batch it runs at once.
    embedded_dtype: str = "fp32"
    embedded_max_batch_size: int = 64
    # The dtype of the weights pushed to the rollout servers at every sync (disk, distributed or tensor).
    # null = for backend=embedded, embedded_dtype (the engine samples with what it is given: a narrower push would
    # round its weights); for backend=sglang, bf16 when CUDA is available, else fp32. Either spelling
    # (bf16 / bfloat16) is accepted; the short name is kept.
    weights_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("embedded", "sglang"):
            raise ConfigError(f"rollout.backend must be embedded or sglang, got {self.backend!r}")
        if self.weight_sync not in ("disk", "distributed", "tensor"):
            raise ConfigError(f"rollout.weight_sync must be disk, distributed or tensor, got {self.weight_sync!r}")
        if self.backend == "embedded" and self.weight_sync != "disk":
            raise ConfigError("rollout.backend=embedded supports only rollout.weight_sync=disk")
        if self.release_memory_in_train and self.backend != "sglang":
            raise ConfigError("rollout.release_memory_in_train=true frees the GPU memory of SGLang servers sharing "
                              f"the trainer's GPUs: it needs rollout.backend=sglang (got {self.backend!r})")
        if self.colocate and self.backend != "embedded":
            raise ConfigError("rollout.colocate=true runs the embedded engine in the trainer process: it needs "
                              f"rollout.backend=embedded, not external servers (got {self.backend!r})")
        self.embedded_dtype = _dtype_field("rollout.embedded_dtype", self.embedded_dtype)
        if self.weights_dtype is None:
            self.weights_dtype = self.embedded_dtype if self.backend == "embedded" else _default_push_dtype()
        self.weights_dtype = _dtype_field("rollout.weights_dtype", self.weights_dtype)
        if self.max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness must be >= 0 (0 = on-policy), got {self.max_staleness}")
        if self.max_staleness > 0 and self.colocate:
            raise ConfigError("rollout.max_staleness > 0 generates the next step's rollout while this step trains: "
                              "a colocated engine (rollout.colocate=true) computes with the parameters the "
                              "optimizer is writing; use a separate rollout server (rollout.colocate=false)")
        if self.max_engine_restarts < 0:
            raise ConfigError(f"rollout.max_engine_restarts must be >= 0 (0 = never restart), "
                              f"got {self.max_engine_restarts}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ConfigError(f"rollout: need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})")


def _dtype_field(key: str, value: str) -> str:
    """The short name (fp32/bf16/fp16) of a dtype field, validated by the one dtype table."""
    try:
        return dtypes.short_name(value)
    except ValueError:
        raise ConfigError(f"{key} must be {', '.join(dtypes.SHORT_NAMES[:-1])} or {dtypes.SHORT_NAMES[-1]} "
                          f"(or {', '.join(dtypes.long_name(d) for d in dtypes.SHORT_NAMES)}), got {value!r}") from None


def _default_push_dtype() -> str:
    """bf16 to SGLang servers on GPU (what they serve in); fp32 on CPU, where bf16 matmuls are slow."""
    from megatron_pz.device import cuda_available

    return "bf16" if cuda_available() else "fp32"
