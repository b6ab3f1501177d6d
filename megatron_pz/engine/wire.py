"""SGLang's wire format: pydantic request models, sampling-parameter parsing, ``/generate`` response items.

Why mirror SGLang exactly: CI and laptops then exercise the very client (``rollout/sglang_client.py``) that talks to
SGLang in production. Shapes are taken from the pinned SGLang release (0.5.23):

* requests: the ``*ReqInput`` classes of ``sglang/srt/managers/io_struct.py`` (same names, same fields, same
  defaults; the fields the embedded engine does not act on are accepted and ignored, like unknown keys);
  sampling params: ``SamplingParams`` (``sglang/srt/sampling/sampling_params.py``); unknown sampling keys are
  rejected like the JSON contract gate does (``sglang/api/v1/api_types.py``: "SamplingParams: unknown keys
  rejected");
* prompt log-probs: with ``return_logprob`` and ``logprob_start_len=0``, ``meta_info.input_token_logprobs`` has one
  ``[logprob, token_id, text]`` per prompt token and, with ``top_logprobs_num=K > 0``, ``input_top_logprobs`` one
  row of K such entries per prompt token, both ``None`` at the first token (no context), as SGLang's
  ``SchedulerLogprobResultProcessor`` lays them out. Other ``logprob_start_len`` values are refused (400), and
  ``output_top_logprobs`` is not computed (the rollout client never asks for it);
* routed experts (MoE, ``return_routed_experts``): ``meta_info.routed_experts`` is a base64 string of int32 ids,
  row-major ``(prompt + response - 1 - routed_experts_start_len, layers, top_k)``: every fed token (the last
  response token is never fed), each layer's top-k expert ids (``RoutedExpertsCapturer`` in
  ``sglang/srt/state_capturer/routed_experts.py``, ``_maybe_collect_routed_experts`` in
  ``sglang/srt/managers/scheduler_components/batch_result_processor.py``, base64 in ``DetokenizerManager``);
* ``/generate`` response: one dict per sample (a list for batch input, prompt-major with ``n`` samples per prompt,
  as ``TokenizerManager._handle_batch_request`` orders them), each ``{"text", "output_ids", "meta_info"}``;
  ``meta_info`` as built in ``TokenizerManager._handle_batch_output`` (``sglang/srt/managers/tokenizer_manager.py``):
  ``id, finish_reason, prompt_tokens, weight_version (str), completion_tokens, cached_tokens, e2e_latency`` and,
  with ``return_logprob``, ``output_token_logprobs`` as ``[[logprob, token_id, text_or_null], ...]``
  (``detokenize_logprob_tokens``). ``finish_reason`` is ``{"type": "stop", "matched": id_or_str}``,
  ``{"type": "length", "length": n}`` or ``{"type": "abort", "message": ...}`` (``FINISH_*.to_json`` in
  ``sglang/srt/managers/schedule_batch.py``).

Where we are stricter or looser than SGLang, the field says why.
"""
from __future__ import annotations

# The request models and checks, the sampling parameters and the response items each have their module; every
# name is importable from here as before.
from megatron_pz.engine.wire_requests import (  # noqa: F401
    BaseReq,
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
    logprob_request,
    parse_version,
    show,
)
from megatron_pz.engine.wire_responses import (  # noqa: F401
    PromptLogprobs,
    finish_reason_json,
    generate_response_item,
    routed_experts_b64,
)
from megatron_pz.engine.wire_sampling import (  # noqa: F401
    NEUTRAL_SAMPLING,
    SGLANG_TOP_K_ALL,
    SUPPORTED_SAMPLING,
    parse_sampling_params,
)
