"""The embedded rollout engine: an SGLang stand-in for CPU machines, laptops and CI.

A transformers model that samples with per-token log-probs and swaps weights atomically, served over SGLang's
HTTP wire format, so the production client (``megatron_pz.rollout``) is exercised exactly as against SGLang.

Modules (each one job):
  model.py       load the HF model and tokenizer, with the checkpoint's sampling defaults neutralised
  generation.py  one batched ``generate`` call: per-token logprobs, SGLang stop semantics, shared prefill
  decode.py      a KV cache written in place, so a decode step does not copy the whole cache
  weights.py     read a safetensors folder, validate a complete state, stage distributed-update buckets
  engine.py      ``EmbeddedEngine``: the engine object (generation, versioned weight updates, pause/abort)
  limits.py      the server's request limits and their defaults
  strict_json.py request bodies as strict JSON (no NaN, duplicate keys, deep nesting, invalid UTF-8)
  wire.py        SGLang's wire format (its shapes and sources), re-exporting the three modules below
  wire_requests.py   request models (pydantic), the HTTPError a request is refused with, version/log-prob checks
  wire_sampling.py   sampling-parameter parsing into ``SamplingParams``
  wire_responses.py  ``/generate`` response items (finish reason, log-probs, routed experts)
  batcher.py     merge concurrent requests into engine calls, run in turns of one chunk each
  endpoints.py   one handler per SGLang endpoint, and the route table
  server.py      ``RolloutServer``: FastAPI on uvicorn, API key, body cap and deadline before the body
  serve.py       the ``megatron-pz serve-rollout`` subcommand

Importing this package imports nothing heavy; import the submodule you need.
"""
