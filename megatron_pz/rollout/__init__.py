"""Rollout layer: one generation/weight-update interface over SGLang servers (or the embedded engine's server).

Modules (each one job):
  protocol.py       SamplingParams, GenerationResult and the RolloutEngine protocol the trainer codes against
  sglang_client.py  HTTP client for ONE server speaking SGLang's native API (retries, clear errors)
  pool.py           several servers (or one sglang-router): balancing, concurrency limits, fail-over
  launcher.py       start SGLang or embedded servers as subprocesses, wait for health, write the endpoints file
  weight_sync.py    push trainer weights (HF names) to the servers: disk, tensor (CUDA IPC) or NCCL broadcast

The embedded engine, its SGLang-compatible server and ``megatron-pz serve-rollout`` are ``megatron_pz.engine``.
Importing this package imports nothing heavy; import the submodule you need.
"""
