"""The SGLang endpoints the embedded server answers, one method each, and the route table that names them.

Bodies are what ``sglang/srt/entrypoints/http_server.py`` returns (``{"success", "message"}``...), status codes
as the embedded server has always answered them. Beyond SGLang, for safety: ``/update_weights_from_disk`` only
reads below ``--weights-dir`` (403 otherwise) and requires a ``weight_version`` strictly above the current one.

Handlers that block on the engine (weight updates wait for the generation lock, a distributed update for the
sender's broadcast) are plain functions, run in the server's thread pool; the others are coroutines, so a long
``/generate`` never holds a thread and a ``/pause_generation`` always gets through.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from megatron_pz.engine.batcher import Batcher
from megatron_pz.engine.limits import RequestLimits
from megatron_pz.engine.openai import OpenAIEndpoints
from megatron_pz.engine.replies import reply
from megatron_pz.engine.wire import (
    ContinueGenerationReqInput,
    DestroyWeightsUpdateGroupReqInput,
    GenerateReqInput,
    GetWeightsByNameReqInput,
    HTTPError,
    InitWeightsUpdateGroupReqInput,
    PauseGenerationReqInput,
    ReleaseMemoryOccupationReqInput,
    ResumeMemoryOccupationReqInput,
    UpdateWeightFromDiskReqInput,
    UpdateWeightsFromDistributedReqInput,
    UpdateWeightsFromTensorReqInput,
    generate_response_item,
    logprob_request,
    parse_sampling_params,
    parse_version,
    show,
)
from megatron_pz.errors import RolloutError, UserError


# The dtype names a distributed update may announce (SGLang sends torch's names without the "torch." prefix).
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def weights_path(model_path: str, weights_dir: str) -> str:
    """``model_path`` resolved (symlinks, ``..``), or HTTPError: 400 for a path that is no valid text path (NUL,
    lone surrogates: bytes that are not UTF-8), 403 for one that resolves outside ``weights_dir``."""
    if not model_path:
        raise HTTPError(400, "model_path (string) is required")
    if "\0" in model_path:
        raise HTTPError(400, f"model_path {show(model_path)} contains a NUL character")
    try:
        model_path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPError(400, f"model_path {show(model_path)} is not valid UTF-8 (character {exc.start})") from None
    real = os.path.realpath(model_path)
    if os.path.commonpath([real, weights_dir]) != weights_dir:
        raise HTTPError(403, f"model_path {show(model_path)} resolves to {show(real)}, outside --weights-dir "
                             f"{show(weights_dir)}")
    return real


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    path: str
    handler: Callable[..., Any]


class Endpoints:
    """Handlers over one engine and its batcher; ``routes()`` lists (methods, path, handler)."""

    def __init__(self, engine: Any, batcher: Batcher, weights_dir: str | None, limits: RequestLimits | None = None):
        """``engine``: an ``EmbeddedEngine``; ``weights_dir``: resolved folder disk updates may read, or None."""
        self.engine = engine
        self.batcher = batcher
        self.weights_dir = weights_dir
        self.limits = limits or RequestLimits()
        self.openai = OpenAIEndpoints(self)

    def routes(self) -> list[Route]:
        return [Route(methods, path, handler) for methods, path, handler in self.openai.routes()] + [
            Route(("GET",), "/health", self.health), Route(("GET",), "/health_generate", self.health),
            Route(("GET",), "/ready", self.health),
            Route(("POST", "PUT"), "/generate", self.generate),
            Route(("GET", "POST"), "/flush_cache", self.flush_cache),
            Route(("GET",), "/get_model_info", self.model_info), Route(("GET",), "/model_info", self.model_info),
            Route(("GET",), "/get_server_info", self.server_info), Route(("GET",), "/server_info", self.server_info),
            Route(("POST",), "/update_weights_from_disk", self.update_from_disk),
            Route(("POST",), "/update_weights_from_tensor", self.update_from_tensor),
            Route(("POST",), "/init_weights_update_group", self.init_group),
            Route(("POST",), "/update_weights_from_distributed", self.update_from_distributed),
            Route(("POST",), "/destroy_weights_update_group", self.destroy_group),
            Route(("GET", "POST"), "/get_weights_by_name", self.get_weights_by_name),
            Route(("POST",), "/pause_generation", self.pause), Route(("POST",), "/continue_generation", self.resume),
            Route(("GET", "POST"), "/release_memory_occupation", self.release_memory),
            Route(("GET", "POST"), "/resume_memory_occupation", self.resume_memory),
        ]

    # ---------------------------------------------------------------- generation

    async def health(self) -> Response:
        ok = self.engine.health() and self.batcher.alive()
        return reply(200 if ok else 503, b"")

    async def generate(self, req: GenerateReqInput | None = None) -> Response:
        req = req or GenerateReqInput()
        if req.stream:
            raise HTTPError(400, "stream=true is not supported by the embedded engine")
        prompts, single = self._prompts(req)
        raw = req.sampling_params
        per_prompt = raw if isinstance(raw, list) else [raw] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise HTTPError(400, f"{len(per_prompt)} sampling_params for {len(prompts)} prompts")
        params = [parse_sampling_params(p, self.limits.max_n) for p in per_prompt]
        if single and params[0].n > 1:
            single = False  # SGLang turns a single prompt with n > 1 into a batch (io_struct._handle_parallel_sampling)
        return_logprob = any(req.return_logprob) if isinstance(req.return_logprob, list) else bool(req.return_logprob)
        with_prompt_logprobs, top_k = logprob_request(req)
        token_text = None
        if req.return_text_in_logprobs and self.engine.tokenizer is not None:
            token_text = lambda tok: self.engine.tokenizer.decode([tok])  # noqa: E731
        # Reject bad prompts here, per request: once merged by the batcher, one bad prompt would fail everyone's.
        try:
            for i, p in enumerate(params):
                self.engine.check_prompts([prompts[i]], p)
        except UserError as exc:
            raise HTTPError(400, str(exc)) from None
        routed_start = self._routed_experts_start(req, prompts)
        prompt_lps = [None] * len(prompts)
        if with_prompt_logprobs:  # one forward per prompt in a worker thread: the event loop stays free
            prompt_lps = await asyncio.to_thread(self.engine.prompt_logprobs, prompts, top_k)
        # Equal params -> one job (merged further by the batcher); otherwise one job per prompt.
        if all(p == params[0] for p in params):
            futures = [(self.batcher.submit(prompts, params[0]), list(range(len(prompts))))]
        else:
            futures = [(self.batcher.submit([prompts[i]], params[i]), [i]) for i in range(len(prompts))]
        items: list[dict | None] = [None] * sum(p.n for p in params)
        offsets = [sum(p.n for p in params[:i]) for i in range(len(params))]
        for future, indices in futures:
            try:
                groups = await asyncio.wrap_future(future)
            except UserError as exc:
                raise HTTPError(400, str(exc)) from None
            for i, group in zip(indices, groups):
                for j, res in enumerate(group):
                    items[offsets[i] + j] = generate_response_item(res, len(prompts[i]), return_logprob, token_text,
                                                                   prompt_lps[i], routed_start)
        return reply(200, items[0] if single else items)

    def _routed_experts_start(self, req: GenerateReqInput, prompts: list[list[int]]) -> int | None:
        """``routed_experts_start_len`` when the request asks for the routing (None when not); 400 for a dense model
        or a start outside [0, shortest prompt] (SGLang aborts such a request)."""
        if not req.return_routed_experts:
            return None
        if not self.engine.is_moe:
            raise HTTPError(400, "return_routed_experts: this server's model is not a mixture of experts")
        start = req.routed_experts_start_len
        if not 0 <= start <= min(len(p) for p in prompts):
            raise HTTPError(400, f"routed_experts_start_len={start} must be in [0, the prompt's length]")
        return start

    def _prompts(self, req: GenerateReqInput) -> tuple[list[list[int]], bool]:
        """(prompts as token ids, whether the body held a single prompt)."""
        if req.input_ids is not None:
            ids = req.input_ids
            prompts, single = ([ids], True) if isinstance(ids[0], int) else (ids, False)
            return self.check_token_prompts(prompts, "input_ids"), single
        if req.text is not None:
            return self.encode_texts([req.text] if isinstance(req.text, str) else req.text, "text"), \
                isinstance(req.text, str)
        raise HTTPError(400, "one of input_ids or text is required")

    def check_token_prompts(self, prompts: list[list[int]], field: str) -> list[list[int]]:
        """``prompts``, or HTTPError(400) naming ``field[i]`` for one longer than the token limit."""
        cap = self.limits.max_prompt_tokens
        for i, p in enumerate(prompts):
            if len(p) > cap:
                raise HTTPError(400, f"{field}[{i}]: {len(p)} tokens exceed this server's limit of {cap} "
                                     "(serve-rollout --max-prompt-tokens)")
        return prompts

    def encode_texts(self, texts: list[str], field: str, add_special_tokens: bool = True) -> list[list[int]]:
        """Text prompts tokenised, each checked against the character limit first and the token limit after."""
        if self.engine.tokenizer is None:
            raise HTTPError(400, f"{field}: text input needs a tokenizer; send token ids")
        # Bounded before tokenising: a tokenizer's time and memory grow with the text.
        for i, t in enumerate(texts):
            if len(t) > self.limits.max_prompt_chars:
                raise HTTPError(400, f"{field}[{i}]: {len(t)} characters exceed this server's limit of "
                                     f"{self.limits.max_prompt_chars} (serve-rollout --max-prompt-chars)")
        prompts = [self.engine.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        return self.check_token_prompts(prompts, field)

    # ---------------------------------------------------------------- information

    async def flush_cache(self) -> Response:
        self.engine.flush_cache()
        return reply(200, "Cache flushed.\n")

    async def model_info(self) -> Response:
        return reply(200, {"model_path": self.engine.model_path, "tokenizer_path": self.engine.model_path,
                           "is_generation": True, "weight_version": str(self.engine.weight_version())})

    async def server_info(self) -> Response:
        return reply(200, {"engine": "megatron_pz.embedded", "model_path": self.engine.model_path,
                           "weight_version": str(self.engine.weight_version()),
                           "max_batch_size": self.engine.max_batch_size, "device": str(self.engine.device)})

    def get_weights_by_name(self, req: GetWeightsByNameReqInput) -> Response:
        try:
            return reply(200, self.engine.get_weights_by_name(req.name, req.truncate_size))
        except RolloutError as exc:
            raise HTTPError(400, str(exc)) from None

    # ---------------------------------------------------------------- weight updates

    def update_from_disk(self, req: UpdateWeightFromDiskReqInput) -> Response:
        if self.weights_dir is None:
            raise HTTPError(403, "disk weight updates are disabled: this server was started without --weights-dir")
        real = weights_path(req.model_path, self.weights_dir)
        version = parse_version(req.weight_version)
        try:
            self.engine.update_weights_from_disk(real, version)
        except (UserError, RolloutError) as exc:
            return reply(400, {"success": False, "message": str(exc), "num_paused_requests": 0})
        return reply(200, {"success": True, "message": f"Succeeded to update model weights. Weight version updated "
                                                       f"to {version}.", "num_paused_requests": 0})

    def update_from_tensor(self, req: UpdateWeightsFromTensorReqInput | None = None) -> Response:
        req = req or UpdateWeightsFromTensorReqInput()
        try:
            self.engine.update_weights_from_tensor(req.serialized_named_tensors, -1)
        except RolloutError as exc:
            return reply(400, {"success": False, "message": str(exc)})
        return reply(200, {"success": True, "message": "Success"})

    def init_group(self, req: InitWeightsUpdateGroupReqInput) -> Response:
        if not req.master_address or "\0" in req.master_address or not req.master_address.isprintable():
            raise HTTPError(400, f"master_address must be a host name or address, got {show(req.master_address)}")
        if not 0 < req.master_port < 65536:
            raise HTTPError(400, f"master_port must be in [1, 65535], got {req.master_port}")
        if req.world_size < 1 or not 0 <= req.rank_offset < req.world_size:
            raise HTTPError(400, f"need world_size >= 1 and 0 <= rank_offset < world_size, got rank_offset="
                                 f"{req.rank_offset}, world_size={req.world_size}")
        try:
            self.engine.init_weights_update_group(req.master_address, req.master_port, req.rank_offset,
                                                  req.world_size, req.group_name, req.backend)
        except Exception as exc:  # noqa: BLE001 - any failure to join is the client's group settings, told back
            return reply(400, {"success": False, "message": f"Failed to initialize custom process group: "
                                                            f"{type(exc).__name__}: {exc}."})
        return reply(200, {"success": True, "message": "Succeeded to initialize custom process group."})

    def update_from_distributed(self, req: UpdateWeightsFromDistributedReqInput) -> Response:
        if req.load_format is not None:
            raise HTTPError(400, f"load_format {show(req.load_format)} is not supported by the embedded engine")
        for i, (dtype, shape) in enumerate(zip(req.dtypes, req.shapes)):
            if dtype not in TENSOR_DTYPES:
                raise HTTPError(400, f"dtypes[{i}]={show(dtype)} is not a tensor dtype ({', '.join(TENSOR_DTYPES)})")
            if any(d < 0 for d in shape):
                raise HTTPError(400, f"shapes[{i}]={show(shape)} has a negative dimension")
        try:
            self.engine.update_weights_from_distributed(req.names, req.dtypes, req.shapes,
                                                        parse_version(req.weight_version), req.group_name)
        except (RolloutError, UserError, RuntimeError) as exc:
            return reply(400, {"success": False, "message": str(exc)})
        return reply(200, {"success": True, "message": "Succeeded to update parameter online."})

    def destroy_group(self, req: DestroyWeightsUpdateGroupReqInput | None = None) -> Response:
        req = req or DestroyWeightsUpdateGroupReqInput()
        try:
            self.engine.destroy_weights_update_group(req.group_name)
        except RolloutError as exc:
            return reply(400, {"success": False, "message": str(exc)})
        return reply(200, {"success": True, "message": "Succeeded to destroy custom process group."})

    # ---------------------------------------------------------------- control

    async def pause(self, req: PauseGenerationReqInput | None = None) -> Response:
        try:
            self.engine.pause_generation((req or PauseGenerationReqInput()).mode)
        except UserError as exc:
            raise HTTPError(400, str(exc)) from None
        return reply(200, {"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, req: ContinueGenerationReqInput | None = None) -> Response:
        self.engine.continue_generation()
        return reply(200, {"message": "Generation continued successfully.", "status": "ok"})

    async def release_memory(self, req: ReleaseMemoryOccupationReqInput | None = None) -> Response:
        self.engine.release_memory_occupation((req or ReleaseMemoryOccupationReqInput()).tags)
        return reply(200, None)  # SGLang's handler returns nothing: FastAPI answers `null`

    async def resume_memory(self, req: ResumeMemoryOccupationReqInput | None = None) -> Response:
        self.engine.resume_memory_occupation((req or ResumeMemoryOccupationReqInput()).tags)
        return reply(200, None)
