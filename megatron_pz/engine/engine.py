"""The embedded rollout engine: batched sampling with per-token logprobs on CPU (or one GPU) via transformers.

It implements the ``RolloutEngine`` protocol (``rollout/protocol.py``: generate, weight version, health, close)
and the weight-update and control calls SGLang serves (disk / tensor / distributed updates, flush, pause,
memory release), so ``server.py`` can put it behind SGLang's endpoints unchanged. Mechanics live next door:
``model.py`` loads the model, ``generation.py`` runs one batch, ``weights.py`` reads and validates new states.

* versioned, all-or-nothing weight updates: a new state is read and validated completely before it is copied in
  under the generation lock, so in-flight generations finish on the old weights and are tagged with the old
  version, and a bad checkpoint never leaves a half-updated model;
* pause/abort: an aborted in-flight batch returns what it generated so far with finish reason "abort".
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from megatron_pz.engine.generation import generate_rows, prompt_logprobs
from megatron_pz.engine.model import LoadedModel, load_model
from megatron_pz.engine.routing import moe_blocks
from megatron_pz.engine.weights import StagedUpdate, StateSpec, read_safetensors_dir, validate_state
from megatron_pz.engine.wire import PromptLogprobs
from megatron_pz.errors import ConfigError, RolloutError
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams
from megatron_pz.rollout.seeds import prompt_seeds, sample_seed

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")  # SGLang's PauseGenerationReqInput.mode
T = TypeVar("T")


class EmbeddedEngine:
    """A transformers causal LM serving the ``RolloutEngine`` protocol in-process (also behind server.py).

    Thread-safety: ``generate`` and weight swaps serialise on one lock; reading/validating new weights happens
    outside it, so generation continues on the old weights while an update is being prepared.
    """

    def __init__(self, model_path: str | Path, dtype: str = "float32", device: str = "cpu",
                 weight_version: int = 0, max_batch_size: int = 64, num_threads: int | None = None,
                 loaded: LoadedModel | None = None, preallocated_kv: bool = True):
        """``loaded``: a model built elsewhere (``model.build_model``, a colocated engine whose weights are the
        trainer's); ``model_path`` then only names it, and ``dtype`` / ``device`` are the model's own.
        ``preallocated_kv``: decode into a KV cache written in place (``decode.py``: the same samples, faster);
        False: transformers' own ``DynamicCache``."""
        self.model_path = str(model_path)
        self.max_batch_size = max_batch_size
        self.preallocated_kv = preallocated_kv
        if num_threads:
            torch.set_num_threads(num_threads)
        self._lm = loaded if loaded is not None else load_model(model_path, dtype, torch.device(device))
        self.device = self._lm.device
        self.model = self._lm.model
        self.tokenizer = self._lm.tokenizer
        self.vocab_size = self._lm.vocab_size
        self.max_positions = self._lm.max_positions
        self.eos_token_ids = set(self._lm.eos_token_ids)  # generation reads it per call (tests may override it)
        self.pad_token_id = self._lm.pad_token_id
        # MoE: every result carries the experts its tokens were routed to (routing.py; SGLang's routed_experts)
        self.is_moe = bool(moe_blocks(self.model))
        self._spec = StateSpec.of(self.model)
        self._lock = threading.Lock()  # held while generating or swapping weights
        self._version = int(weight_version)
        self._running = threading.Event()  # cleared while paused
        self._running.set()
        self._abort = threading.Event()  # set by pause_generation(mode="abort")
        self._groups: dict[str, object] = {}  # weight-update process groups by name
        self._staged = StagedUpdate(self._spec)  # distributed update in progress
        logger.info("embedded engine: %s (%s, %s), %.1fM params, weight version %d", model_path, dtype, device,
                    sum(p.numel() for p in self.model.parameters()) / 1e6, self._version)

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int | None] | None = None) -> list[list[GenerationResult]]:
        """Sample ``params.n`` responses per prompt; see ``RolloutEngine.generate``.

        Seeds (``rollout/seeds.py``): prompt i's seed is ``seeds[i]`` when given (the batcher merges requests with
        different seeds), else ``params.seed + i``; its sample j draws from ``sample_seed(prompt seed, j)``.
        """
        results: list[list[GenerationResult | None]] = [[None] * params.n for _ in prompts]
        for chunk in self.plan_chunks(prompts, params):
            for (i, j), res in zip(chunk, self.generate_chunk(prompts, params, chunk, seeds)):
                results[i][j] = res
        return results  # type: ignore[return-value]

    def plan_chunks(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[tuple[int, int]]]:
        """The engine calls of one ``generate``: (prompt, sample) rows in chunks of at most ``max_batch_size``.

        Rows are sorted by prompt length so each chunk pads little. The server's batcher runs the chunks of
        several requests in turn (``generate_chunk``); a seeded request gives the same samples either way.
        """
        self.check_prompts(prompts, params)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        rows.sort(key=lambda r: -len(prompts[r[0]]))
        return [rows[start:start + self.max_batch_size] for start in range(0, len(rows), self.max_batch_size)]

    def generate_chunk(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                       chunk: list[tuple[int, int]],
                       seeds: Sequence[int | None] | None = None) -> list[GenerationResult]:
        """One sample per (prompt, sample) row of ``chunk`` (from ``plan_chunks``), in one batch.

        ``seeds`` as in ``generate``. Each row draws from its own seeded stream, so a seeded row's response does not
        depend on the chunk it lands in."""
        if seeds is None:
            seeds = prompt_seeds(params.seed, len(prompts))
        self._running.wait()  # paused: wait for continue_generation (SGLang holds new requests the same way)
        with self._lock:
            out = generate_rows(self._lm, [prompts[i] for i, _ in chunk], params, self._version,
                                self.eos_token_ids, self._abort,
                                row_seeds=[sample_seed(seeds[i], j) for i, j in chunk],
                                preallocated_kv=self.preallocated_kv)
        for (i, _), res in zip(chunk, out):
            res.prompt_index = i
        return out

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], top_k: int) -> list[PromptLogprobs]:
        """Each prompt's own token log-probs and top-``top_k`` rows (one forward per prompt, nothing sampled)."""
        self._check_ids(prompts, new_tokens=0)  # a prompt that fills the context exactly is still scored
        out = []
        for p in prompts:
            self._running.wait()
            with self._lock:
                out.append(prompt_logprobs(self._lm, p, top_k))
        return out

    def input_top_logprobs(self, prompts: Sequence[Sequence[int]], top_k: int) -> list[list[list[float]]]:
        """See ``RolloutEngine.input_top_logprobs``."""
        return [[[lp for lp, _ in row] if row else [] for row in p.top or []]
                for p in self.prompt_logprobs(prompts, top_k)]

    def check_prompts(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """ConfigError naming the first prompt this engine cannot serve (empty, unknown ids, too long)."""
        self._check_ids(prompts, params.max_new_tokens)
        if params.stop and self.tokenizer is None:
            raise ConfigError(f"stop strings need a tokenizer, and {self.model_path} has none")

    def _check_ids(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> None:
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ConfigError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ConfigError(f"prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
            if self.max_positions and len(p) + new_tokens > self.max_positions:
                plus = f" + max_new_tokens {new_tokens}" if new_tokens else ""
                raise ConfigError(f"prompt {i}: {len(p)} tokens{plus} exceeds the model's max_position_embeddings "
                                  f"{self.max_positions}")

    # ---------------------------------------------------------------- protocol

    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return self.model is not None

    def close(self) -> None:
        """Nothing to release: the model lives as long as the engine object."""

    # ---------------------------------------------------------------- weights

    def _check_version(self, version: int) -> None:
        if version <= self._version:
            raise RolloutError(f"refusing weight version {version}: the engine already serves version "
                               f"{self._version} (versions must strictly increase)")

    def swap_weights(self, tensors: Mapping[str, torch.Tensor], version: int, source: str) -> None:
        """Validate a complete state, then copy it in under the generation lock (all or nothing)."""
        self._check_version(version)
        state = validate_state(tensors, self._spec, source)
        params = self.model.state_dict()
        with self._lock:
            self._check_version(version)  # another update may have landed meanwhile
            for name, t in state.items():
                params[name].copy_(t)  # shapes/dtypes were validated: this cannot fail half-way
            self._version = version
        logger.info("weights updated to version %d from %s", version, source)

    def update_weights_in_place(self, version: int, refresh: Callable[[], T]) -> T:
        """Colocated: the model's parameters are the trainer's own tensors, already updated in place by its
        optimizer. ``refresh`` re-points them and re-materialises what is not shared
        (``convert.bridge.share_hf_params``); it runs under the generation lock, so no batch sees a half-done
        refresh, and the version moves when it returns. Returns what ``refresh`` returns."""
        self._check_version(version)
        with self._lock:
            self._check_version(version)
            out = refresh()
            self._version = version
        logger.info("weights updated to version %d in place", version)
        return out

    def update_weights_from_disk(self, model_path: str, version: int) -> None:
        self._check_version(version)  # refuse early, before reading gigabytes
        self.swap_weights(read_safetensors_dir(model_path), version, source=str(model_path))

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], version: int,
                                   load_format: str | None = "flattened_bucket") -> None:
        raise RolloutError("update_weights_from_tensor needs CUDA IPC with a colocated SGLang server; the embedded "
                           "engine takes /update_weights_from_disk or /update_weights_from_distributed (gloo)")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        from megatron_pz.rollout.process_group import init_custom_process_group

        if backend == "nccl" and self.device.type != "cuda":
            raise RolloutError(f"backend 'nccl' needs a GPU; this embedded engine runs on {self.device} (use gloo)")
        if group_name in self._groups:
            raise RolloutError(f"weight update group {group_name!r} already exists")
        # The engine is one rank: SGLang uses rank_offset + tp_rank, and our tp_rank is 0.
        self._groups[group_name] = init_custom_process_group(backend, master_address, master_port, world_size,
                                                             rank_offset, group_name)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        version: int, group_name: str = "weight_update_group") -> None:
        """Receive one bucket; apply the update once every model tensor of ``version`` has arrived (staged)."""
        from megatron_pz.rollout.process_group import broadcast_from_rank0

        group = self._groups.get(group_name)
        if group is None:
            raise RolloutError(f"no weight update group {group_name!r}; call /init_weights_update_group first")
        if not len(names) == len(dtypes) == len(shapes):
            raise RolloutError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
        # Receive first, whatever happens next: the sender is blocked in the broadcast until we do.
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)  # SGLang's dtype names
            broadcast_from_rank0(t, group)
            received.append((name, t))
        self._staged.start(version)
        self._check_version(version)
        complete = self._staged.add(received)
        if complete is not None:
            self.swap_weights(complete, version, source=f"distributed group {group_name!r}")

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        import torch.distributed as dist

        group = self._groups.pop(group_name, None)
        if group is None:
            raise RolloutError(f"no weight update group {group_name!r} to destroy")
        dist.destroy_process_group(group)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """First ``truncate_size`` rows of a tensor as nested lists (SGLang's ``get_weights_by_name`` shape)."""
        state = self.model.state_dict()
        if name not in state:
            raise RolloutError(f"no tensor named {name!r} in the model")
        return state[name].float().cpu().tolist()[:truncate_size]

    # ---------------------------------------------------------------- control

    def flush_cache(self) -> None:
        """Nothing to flush: transformers' KV cache lives only for one generate call (no prefix cache)."""

    def pause_generation(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ConfigError(f"pause mode must be abort|retract|in_place, got {mode!r}")
        self._running.clear()
        if mode == "abort":
            self._abort.set()  # the in-flight batch stops at its next token and returns finish reason "abort"

    def continue_generation(self) -> None:
        self._abort.clear()
        self._running.set()

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        logger.info("release_memory_occupation(%s): no-op for the embedded engine", tags)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        logger.info("resume_memory_occupation(%s): no-op for the embedded engine", tags)
