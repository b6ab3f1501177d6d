"""The rollout contract the trainer codes against: sampling parameters, one generated sample, the engine protocol.

Every backend (an SGLang server, a pool of them, the embedded engine in-process or behind HTTP) implements
``RolloutEngine``; the trainer never learns which one it talks to. Weight updates are the separate
``WeightUpdater`` protocol (updater.py).

What a logprob means here (the same everywhere, and what the GRPO/PPO ratio needs):
    logprobs[i] = log softmax(logits_i / temperature)[response_ids[i]]
i.e. the log-probability of the *sampled* token under the temperature-scaled distribution, *before* any top-p /
top-k truncation. This is what SGLang returns by default: ``Sampler.forward`` in
``sglang/srt/layers/sampler.py`` divides the logits by the temperature, takes the softmax, and returns
``log(probs)`` of that un-truncated distribution (top-p/top-k only pick the token). With temperature 0
(greedy) both SGLang and we return log softmax(logits). The trainer must therefore recompute
``log_softmax(logits / temperature)`` at the sampled tokens for the ratio to be exactly 1 on-policy.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from megatron_pz.errors import ConfigError
from megatron_pz.types import Sample, Status

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]

# How a finish reason maps onto the pipeline's Sample.status (types.py).
_STATUS_OF_FINISH: dict[str, Status] = {
    "stop": Status.COMPLETED,
    "length": Status.TRUNCATED,
    "abort": Status.ABORTED,
}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one generate call; every prompt of the call gets ``n`` samples.

    Field names follow SGLang's ``SamplingParams`` (``sglang/srt/sampling/sampling_params.py``) except ``seed``,
    which is sent as ``sampling_seed``.
    """

    n: int = 1
    """Samples per prompt (a GRPO group)."""
    max_new_tokens: int = 128
    """Upper bound on response tokens; hitting it gives finish reason "length"."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 = disabled."""
    stop: tuple[str, ...] = ()
    """Stop strings; the response keeps the tokens up to and including the one completing the match."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens besides EOS."""
    ignore_eos: bool = False
    seed: int | None = None
    """Per-request sampling seed (SGLang ``sampling_seed``); None = nondeterministic."""
    skip_special_tokens: bool = True
    """Only affects the returned text, never the token ids."""

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; store tuples so the object stays hashable (server batching key).
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.n < 1:
            raise ConfigError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"SamplingParams.top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ConfigError("SamplingParams.stop must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationResult:
    """One sample generated for one prompt.

    Invariants: ``len(logprobs) == len(response_ids)``; ``response_ids`` holds every generated token, including
    a final EOS / stop token (SGLang returns ``output_ids`` untrimmed; only ``text`` is trimmed of a stop string).
    """

    prompt_index: int
    """Index of the prompt in the batch passed to ``generate``."""
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int
    """Version of the weights that generated the first token (-1 if the server reported none)."""
    text: str | None = None
    matched_stop: int | str | None = None
    """The EOS/stop token id or stop string that ended generation (finish reason "stop")."""
    mixed_versions: bool = False
    """True if the server swapped weights mid-sample (SGLang ``meta_info.weight_versions`` has >1 span)."""
    server: str | None = None
    """URL of the server that produced the sample (None in-process)."""
    extra: dict = field(default_factory=dict)
    routed_experts: Any = None
    """MoE models, when asked for (routing replay): int ``numpy`` array ``(P + R - 1, L * K)``, row t the top-k
    expert ids of every layer (layer-major) for token t of prompt + response (the last response token is never
    fed, so it has no row). SGLang's ``meta_info.routed_experts``; None otherwise."""

    @property
    def status(self) -> Status:
        return _STATUS_OF_FINISH[self.finish_reason]


def fill_sample(sample: Sample, result: GenerationResult) -> Sample:
    """Copy a generation result into the pipeline record (in place) and return it.

    A result without a valid weight version (-1: a server reporting a partial update, "default", or anything
    non-integer) or generated across a weight swap is marked ABORTED: it is never trained on.
    """
    sample.response_ids = list(result.response_ids)
    sample.rollout_logprobs = list(result.logprobs)
    sample.response_text = result.text or ""
    sample.finish_reason = result.finish_reason
    sample.status = result.status
    sample.weight_version = result.weight_version
    sample.routed_experts = result.routed_experts
    if result.weight_version < 0 or result.mixed_versions:
        if sample.status != Status.ABORTED:
            logger.warning("sample from %s has weight version %d%s: marked aborted (launch SGLang with "
                           "--weight-version, as rollout/launcher.py does)", result.server or "engine",
                           result.weight_version, " (mixed)" if result.mixed_versions else "")
        sample.status = Status.ABORTED
    return sample


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer and eval need from a rollout backend. Implemented by ``SGLangClient`` (one server),
    ``RolloutPool`` (several) and ``EmbeddedEngine`` (in-process).

    Weight updates are a separate protocol (``rollout/updater.py``, ``WeightUpdater``) driven by
    ``megatron_pz.weight_sync``. Methods raise ``megatron_pz.errors.RolloutError`` (naming the server/endpoint)
    on failure.
    """

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[GenerationResult]]:
        """``result[i][j]`` = j-th of ``params.n`` samples for ``prompts[i]`` (input order is preserved)."""
        ...

    def input_top_logprobs(self, prompts: Sequence[Sequence[int]], top_k: int) -> list[list[list[float]]]:
        """``result[i][t]``: the ``top_k`` largest log-probs (descending) of the model's distribution for token ``t``
        of ``prompts[i]`` given its tokens ``< t``; ``result[i][0] == []`` (no context). One prefill per prompt,
        nothing sampled. From the raw logits (temperature 1): SGLang's ``input_top_logprobs`` of a /generate
        request with ``logprob_start_len=0`` and ``top_logprobs_num=top_k``."""
        ...

    def weight_version(self) -> int:
        """Version of the weights that new requests are served with (integers that strictly increase)."""
        ...

    def health(self) -> bool:
        """True if the engine can generate right now."""
        ...

    def close(self) -> None:
        """Release connections and worker threads (the servers themselves keep running)."""
        ...
