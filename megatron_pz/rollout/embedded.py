"""The embedded rollout engine: batched sampling with per-token logprobs on CPU (or one GPU) via transformers.

Decoding, the KV cache and sampling are transformers' ``generate``; this module only adds what RL needs on top:

* per-token logprobs of the *sampled* tokens, ``log softmax(logits / T)`` before top-p/top-k (see protocol.py
  for why this is the SGLang-compatible definition), recorded by a logits processor that sees the raw logits
  (custom processors run before generate's temperature/top-k/top-p warpers) and gathered at the chosen token
  by a stopping criterion, so memory stays O(batch x vocab) instead of keeping every step's logits;
* SGLang stop semantics: EOS / ``stop_token_ids`` / stop strings end a sample and the ending token is kept in
  ``response_ids`` (SGLang returns ``output_ids`` untrimmed; only the text is trimmed, see
  ``DetokenizerManager.trim_matched_stop`` in ``sglang/srt/managers/detokenizer_manager.py``);
* versioned, all-or-nothing weight updates: a new state is read and validated completely (every name, shape,
  dtype, finiteness) before it is copied in under the generation lock, so in-flight generations finish on the
  old weights and are tagged with the old version, and a bad checkpoint never leaves a half-updated model;
* pause/abort: an aborted in-flight batch returns what it generated so far with finish reason "abort".

Shapes: B = prompts in a chunk x n samples (one row per sample), L = padded prompt length, T = new tokens.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_pz.errors import CheckpointError, ConfigError, RolloutError
from megatron_pz.rollout.protocol import GenerationResult, SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """'float32' / 'bf16' / ... -> torch.dtype (ConfigError naming the value otherwise)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


# --------------------------------------------------------------------------------------------------------------
# Reading and validating a weight state (disk updates, distributed updates)
# --------------------------------------------------------------------------------------------------------------

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
class _ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _state_spec(model: torch.nn.Module) -> tuple[dict[str, _ParamSpec], dict[str, list[str]]]:
    """Expected tensors of ``model`` and its alias groups (tied weights share storage, e.g. lm_head/embeddings)."""
    state = model.state_dict()
    spec = {name: _ParamSpec(tuple(t.shape), t.dtype) for name, t in state.items()}
    by_storage: dict[int, list[str]] = {}
    for name, t in state.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    aliases = {name: group for group in by_storage.values() if len(group) > 1 for name in group}
    return spec, aliases


def validate_state(
    tensors: Mapping[str, torch.Tensor],
    spec: Mapping[str, _ParamSpec],
    aliases: Mapping[str, list[str]],
    source: str,
) -> dict[str, torch.Tensor]:
    """Check a complete new state against the model and return it cast to the model's dtypes.

    Every model tensor must be present (a tied alias may stand in for its partner), no unknown name may appear,
    shapes must match exactly and values must be finite. Errors name ``source`` and the tensor.
    """
    unexpected = sorted(set(tensors) - set(spec))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors not in the model: {unexpected[:5]}"
                              + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    missing = [n for n in spec if n not in tensors and not any(a in tensors for a in aliases.get(n, []))]
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {missing[:5]}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    out: dict[str, torch.Tensor] = {}
    for name, want in spec.items():
        t = tensors.get(name)
        if t is None:
            t = next(tensors[a] for a in aliases[name] if a in tensors)
        if tuple(t.shape) != want.shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, model expects {want.shape}")
        if t.dtype.is_floating_point != want.dtype.is_floating_point:
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {t.dtype}, model expects {want.dtype}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {name!r} contains NaN or Inf")
        out[name] = t.to(want.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# Generation hooks
# --------------------------------------------------------------------------------------------------------------

class _LogprobRecorder:
    """Logits processor (first in generate's list, so it sees raw fp32 logits) that stashes log-probs."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.step_logprobs: torch.Tensor | None = None  # (B, V)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scaled = scores / self.temperature if self.temperature > 0 else scores
        self.step_logprobs = torch.log_softmax(scaled, dim=-1)
        return scores


class _StopAndGather:
    """Stopping criterion run after each token: gathers the chosen token's logprob and applies SGLang stops.

    It records, per row, the step at which the sample ended and what matched (EOS/stop token id or stop string).
    HF's own EOS criterion only pads finished rows; the authoritative end of each sample is decided here.
    """

    def __init__(self, recorder: _LogprobRecorder, prompt_len: int, batch: int, stop_ids: set[int],
                 stop_strs: tuple[str, ...], tokenizer, abort: threading.Event | None):
        self.recorder = recorder
        self.prompt_len = prompt_len
        self.stop_ids = stop_ids
        self.stop_strs = stop_strs
        self.tokenizer = tokenizer
        self.abort = abort
        self.logprobs: list[torch.Tensor] = []  # T x (B,)
        self.end_step = [-1] * batch  # index of the last kept token, -1 while running
        self.matched: list[int | str | None] = [None] * batch
        self.aborted = False
        # A stop string can only newly appear in the tail; 4 byte-level tokens can make up one character.
        self.tail_tokens = 4 * max((len(s) for s in stop_strs), default=0) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        step = input_ids.shape[1] - self.prompt_len - 1
        new_tokens = input_ids[:, -1]
        self.logprobs.append(self.recorder.step_logprobs.gather(1, new_tokens[:, None]).squeeze(1))
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, tok in enumerate(new_tokens.tolist()):
            if self.end_step[row] >= 0:
                done[row] = True
                continue
            if tok in self.stop_ids:
                self.end_step[row], self.matched[row] = step, tok
            elif self.stop_strs:
                tail = input_ids[row, max(self.prompt_len, input_ids.shape[1] - self.tail_tokens):].tolist()
                text = self.tokenizer.decode(tail, skip_special_tokens=False)
                hit = next((s for s in self.stop_strs if s in text), None)
                if hit is not None:
                    self.end_step[row], self.matched[row] = step, hit
            done[row] = self.end_step[row] >= 0
        if self.abort is not None and self.abort.is_set():
            self.aborted = True
            done[:] = True
        return done


# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------

class EmbeddedEngine:
    """A transformers causal LM serving the ``RolloutEngine`` protocol in-process (also used by server.py).

    Thread-safety: ``generate`` and weight swaps serialise on one lock; reading/validating new weights happens
    outside it, so generation continues on the old weights while an update is being prepared.
    """

    def __init__(self, model_path: str | Path, dtype: str = "float32", device: str = "cpu",
                 weight_version: int = 0, max_batch_size: int = 64, num_threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        if num_threads:
            torch.set_num_threads(num_threads)
        if not (Path(model_path) / "config.json").is_file():
            raise CheckpointError(f"{model_path}: not an HF model folder (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception as exc:  # a folder without tokenizer files still serves token ids
            logger.warning("no tokenizer in %s (%s): stop strings and text output are unavailable", model_path, exc)
            self.tokenizer = None
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=parse_dtype(dtype))
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self._spec, self._aliases = _state_spec(self.model)
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = cfg.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        pad = self.model.generation_config.pad_token_id
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else min(self.eos_token_ids, default=0))
        # generate() fills every field we leave unset from model.generation_config; a checkpoint's defaults
        # (repetition_penalty, top_k, suppress_tokens, ...) would silently change the sampling distribution and
        # run before our logprob recorder. Keep only the special token ids.
        dropped = {k: v for k, v in self.model.generation_config.to_diff_dict().items()
                   if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version", "use_cache")
                   and not k.startswith(("output_", "_", "return_"))}
        if dropped:
            logger.info("ignoring the checkpoint's generation defaults %s (requests carry all sampling params)",
                        dropped)
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id, eos_token_id=sorted(self.eos_token_ids) or None,
            pad_token_id=self.pad_token_id)

        # Prefill each distinct prompt once per batch (see _shared_prompt_cache); off for cache types we do not know.
        self._share_prompts = type(self.model).__name__.startswith(("Llama", "Qwen2", "Qwen3", "Mistral"))
        # transformers >= 5.x names the KV-cache argument `cache` (`past_key_values` deprecated); older: the latter.
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._lock = threading.Lock()  # held while generating or swapping weights
        self._version = int(weight_version)
        self._running = threading.Event()  # cleared while paused
        self._running.set()
        self._abort = threading.Event()  # set by pause_generation(mode="abort")
        self._groups: dict[str, object] = {}  # weight-update process groups by name
        self._staged: dict[str, torch.Tensor] = {}  # distributed update in progress
        self._staged_version: int | None = None
        logger.info("embedded engine: %s (%s, %s), %.1fM params, weight version %d", model_path, dtype, device,
                    sum(p.numel() for p in self.model.parameters()) / 1e6, self._version)

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        """Sample ``params.n`` responses per prompt; see ``RolloutEngine.generate``."""
        self.check_prompts(prompts, params)
        # One row per (prompt, sample); rows sorted by prompt length so each chunk pads little.
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        rows.sort(key=lambda r: -len(prompts[r[0]]))
        results: list[list[GenerationResult | None]] = [[None] * params.n for _ in prompts]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            self._running.wait()  # paused: wait for continue_generation (SGLang holds new requests the same way)
            for (i, j), res in zip(chunk, self._generate_rows([prompts[i] for i, _ in chunk], params)):
                res.prompt_index = i
                results[i][j] = res
        return results  # type: ignore[return-value]

    def check_prompts(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """ConfigError naming the first prompt this engine cannot serve (empty, unknown ids, too long)."""
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ConfigError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ConfigError(f"prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
            if self.max_positions and len(p) + params.max_new_tokens > self.max_positions:
                raise ConfigError(f"prompt {i}: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                                  f"model's max_position_embeddings {self.max_positions}")
        if params.stop and self.tokenizer is None:
            raise ConfigError(f"stop strings need a tokenizer, and {self.model_path} has none")

    @torch.no_grad()
    def _generate_rows(self, rows: list[Sequence[int]], params: SamplingParams) -> list[GenerationResult]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        with self._lock:
            version = self._version
            t0 = time.perf_counter()
            prompt_len = max(len(r) for r in rows)
            # Left padding: every row's next token is at the same column; generate derives positions from the mask.
            input_ids = torch.full((len(rows), prompt_len), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), prompt_len), dtype=torch.long)
            for r, ids in enumerate(rows):
                input_ids[r, prompt_len - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
                attention_mask[r, prompt_len - len(ids):] = 1
            stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            recorder = _LogprobRecorder(params.temperature)
            stopper = _StopAndGather(recorder, prompt_len, len(rows), stop_ids, params.stop, self.tokenizer,
                                     self._abort)
            # A fresh config: the model's generation_config defaults (repetition penalty, top_k=50, ...) must not
            # leak in, both for SGLang parity and so our recorder is the first processor to see the logits.
            gen_cfg = GenerationConfig(
                max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy,
                temperature=params.temperature if not params.greedy else None,
                top_p=params.top_p if not params.greedy else None,
                top_k=(max(0, params.top_k)) if not params.greedy else None,
                pad_token_id=self.pad_token_id,
                eos_token_id=None if params.ignore_eos else sorted(self.eos_token_ids) or None,
            )
            if params.seed is not None:
                torch.manual_seed(params.seed)
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            cache = self._shared_prompt_cache(rows, input_ids, attention_mask)
            cache_arg = {self._cache_kw: cache} if cache is not None else {}
            sequences = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **cache_arg,
                generation_config=gen_cfg, logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=StoppingCriteriaList([stopper]),
            ).cpu()
            elapsed = time.perf_counter() - t0
        new_tokens = sequences[:, prompt_len:]
        logprobs = torch.stack(stopper.logprobs, dim=1)[:, :new_tokens.shape[1]].float() if stopper.logprobs \
            else torch.zeros((len(rows), 0))
        out = []
        for r in range(len(rows)):
            end = stopper.end_step[r]
            if end >= 0:
                n_keep, reason, matched = end + 1, "stop", stopper.matched[r]
            elif stopper.aborted:
                n_keep, reason, matched = new_tokens.shape[1], "abort", None
            else:
                n_keep, reason, matched = new_tokens.shape[1], "length", None
            ids = new_tokens[r, :n_keep].tolist()
            out.append(GenerationResult(
                prompt_index=-1, response_ids=ids, logprobs=logprobs[r, :n_keep].tolist(), finish_reason=reason,
                weight_version=version, text=self._text(ids, matched, params), matched_stop=matched,
                extra={"e2e_latency": elapsed},
            ))
        return out

    def _shared_prompt_cache(self, rows: list[Sequence[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The KV cache of columns [0, L-1) for every row, computed once per *distinct* prompt.

        A request for n samples of one prompt arrives as n identical rows. ``generate`` would prefill each of them:
        n x the prompt's forward pass. Instead each distinct prompt is prefilled once, without its last token, and
        the cache rows are copied to the rows that share it; ``generate`` then feeds only the last prompt column
        (it skips the columns a given cache covers) and samples as before. Positions follow ``generate``'s own rule
        for left padding (cumsum of the mask - 1). Returns None (plain ``generate``) when no prompt repeats, for
        prompts of one token, or for models whose cache is not a plain ``DynamicCache``.
        """
        from transformers import DynamicCache

        if input_ids.shape[1] < 2 or not self._share_prompts:
            return None
        first: dict[tuple[int, ...], int] = {}
        index = [first.setdefault(tuple(r), len(first)) for r in rows]
        if len(first) == len(rows):
            return None
        rep = [0] * len(first)
        for row, u in enumerate(index):
            if rep[u] == 0:
                rep[u] = row + 1
        sel = torch.tensor([r - 1 for r in rep], device=input_ids.device)
        ids_u, mask_u = input_ids[sel, :-1], attention_mask[sel, :-1]
        pos = (mask_u.long().cumsum(-1) - 1).masked_fill_(mask_u == 0, 1)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids_u, attention_mask=mask_u, position_ids=pos, use_cache=True, logits_to_keep=1,
                   **{self._cache_kw: cache})
        cache.batch_select_indices(torch.tensor(index, device=input_ids.device))
        return cache

    def _text(self, ids: list[int], matched: int | str | None, params: SamplingParams) -> str | None:
        """Decoded response, trimmed like SGLang's DetokenizerManager.trim_matched_stop (no_stop_trim=False)."""
        if self.tokenizer is None:
            return None
        if isinstance(matched, int) and ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        if isinstance(matched, str):
            pos = text.find(matched)
            if pos >= 0:
                text = text[:pos]
        return text

    # ---------------------------------------------------------------- weights

    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return self.model is not None

    def _check_version(self, version: int) -> None:
        if version <= self._version:
            raise RolloutError(f"refusing weight version {version}: the engine already serves version "
                               f"{self._version} (versions must strictly increase)")

    def swap_weights(self, tensors: Mapping[str, torch.Tensor], version: int, source: str) -> None:
        """Validate a complete state, then copy it in under the generation lock (all or nothing)."""
        self._check_version(version)
        state = validate_state(tensors, self._spec, self._aliases, source)
        params = self.model.state_dict()
        with self._lock:
            self._check_version(version)  # another update may have landed meanwhile
            for name, t in state.items():
                params[name].copy_(t)  # shapes/dtypes were validated: this cannot fail half-way
            self._version = version
        logger.info("weights updated to version %d from %s", version, source)

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
        """Receive one bucket; apply the update once every model tensor of ``version`` has arrived.

        SGLang loads each bucket immediately (the sender pauses generation around the transfer); we stage buckets
        and swap all at once, so no generation ever sees a partially updated model.
        """
        from megatron_pz.rollout.process_group import broadcast_from_rank0

        group = self._groups.get(group_name)
        if group is None:
            raise RolloutError(f"no weight update group {group_name!r}; call /init_weights_update_group first")
        if not len(names) == len(dtypes) == len(shapes):
            raise RolloutError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
        # Receive first, whatever happens next: the sender is blocked in the broadcast until we do.
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            broadcast_from_rank0(t, group)
            received.append((name, t))
        if self._staged_version != version:
            if self._staged:
                logger.warning("dropping %d staged tensors of incomplete version %s", len(self._staged),
                               self._staged_version)
            self._staged, self._staged_version = {}, version
        self._check_version(version)
        for name, t in received:
            if name not in self._spec:
                self._staged, self._staged_version = {}, None
                raise CheckpointError(f"distributed update v{version}: unexpected tensor {name!r}")
            self._staged[name] = t
        covered = all(n in self._staged or any(a in self._staged for a in self._aliases.get(n, []))
                      for n in self._spec)
        if covered:
            staged, self._staged, self._staged_version = self._staged, {}, None
            self.swap_weights(staged, version, source=f"distributed group {group_name!r}")

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
        if mode not in ("abort", "retract", "in_place"):
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

