"""Rollout layer: one generation/weight-update interface over SGLang servers (or the embedded engine's server).

Pushing the trainer's weights to the servers is ``megatron_pz.weight_sync`` (disk, CUDA IPC or NCCL broadcast).

Modules (each one job):
  protocol.py       SamplingParams, GenerationResult and the RolloutEngine protocol the trainer codes against
  updater.py        the WeightUpdater protocol: the weight-update endpoints megatron_pz.weight_sync calls
  sglang_client.py  client for ONE server speaking SGLang's native API, one method per endpoint
  sglang_wire.py    SGLang's request bodies and /generate response parsing (pure)
  http_transport.py HTTP to one server: keep-alive session, timeouts, retries, clear errors
  pool.py           several servers (or one sglang-router): balancing, concurrency limits, fail-over
  launcher.py       start SGLang or embedded servers as subprocesses, wait for health, write the endpoints file
  process_group.py  the trainer <-> engines broadcast group (both ends of the distributed weight path)

The embedded engine, its SGLang-compatible server and ``megatron-pz serve-rollout`` are ``megatron_pz.engine``.
Importing this package imports nothing heavy; import the submodule you need.
"""
