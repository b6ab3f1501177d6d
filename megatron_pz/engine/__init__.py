"""The embedded rollout engine: an SGLang stand-in for CPU machines, laptops and CI.

A transformers model that samples with per-token log-probs and swaps weights atomically, served over SGLang's
HTTP wire format, so the production client (``megatron_pz.rollout``) is exercised exactly as against SGLang.

Modules (each one job):
  model.py       load the HF model and tokenizer, with the checkpoint's sampling defaults neutralised
  generation.py  one batched ``generate`` call: per-token logprobs, SGLang stop semantics, shared prefill
  weights.py     read a safetensors folder, validate a complete state, stage distributed-update buckets
  engine.py      ``EmbeddedEngine``: the engine object (generation, versioned weight updates, pause/abort)
  wire.py        SGLang's request models (pydantic), sampling-parameter parsing, ``/generate`` response items
  batcher.py     merge concurrent requests into one engine call
  endpoints.py   one handler per SGLang endpoint, and the route table
  server.py      ``RolloutServer``: FastAPI on uvicorn, API key and body cap before the body is read
  serve.py       the ``megatron-pz serve-rollout`` subcommand
  tiny.py        a tiny random Llama + byte tokenizer for tests and quick benches

Importing this package imports nothing heavy; import the submodule you need.
"""
