"""Rollout layer: one generation/weight-update interface over SGLang servers or an embedded CPU engine.

Modules (each one job):
  protocol.py       SamplingParams, GenerationResult and the RolloutEngine protocol the trainer codes against
  sglang_client.py  HTTP client for ONE server speaking SGLang's native API (retries, clear errors)
  pool.py           several servers (or one sglang-router): balancing, concurrency limits, fail-over
  embedded.py       the CPU/single-GPU engine: transformers generate + per-token logprobs + atomic weight swap
  server.py         that engine behind SGLang's HTTP endpoints (so CI drives the production client)
  serve.py          the ``megatron-pz serve-rollout`` subcommand
  launcher.py       start SGLang or embedded servers as subprocesses, wait for health, write the endpoints file
  weight_sync.py    push trainer weights (HF names) to the servers: disk, tensor (CUDA IPC) or NCCL broadcast
  tiny.py           a tiny random Llama + byte tokenizer for tests and quick benches

Importing this package imports nothing heavy; import the submodule you need.
"""
