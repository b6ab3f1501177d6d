"""The colocated engine of a model-parallel run (``rollout.colocate=true`` at TP2 and PP2, gloo): global rank 0
keeps its own full HF copy, and a weight sync copies the gathered tensors into it in memory.

Two spawned processes on a tiny Qwen3 (Megatron model + DDP + distributed optimizer, fp32). ``connect_colocated``
runs on the real config, publisher and model chunks: rank 0 builds the engine from the run's HF meta and serves it
on a thread, the URL (and key) is broadcast. At TP2 ``$MEGATRON_PZ_ROLLOUT_API_KEY`` is set: the server requires
it, a request without it is refused, and the pool sends it. At PP2 the ranks are made to look as if they spanned
two nodes: the server binds every interface, is named by the host name, and requires a key generated for the run. Then one real optimizer step (GRPO loss on the engine's
own samples) and ``WeightPublisher.push`` (collective export + ``InMemoryWeightSync``). The reference is the disk
sync: the same export written by ``DiskWeightSync`` and loaded by a disaggregated engine from that folder. The
in-memory copy must equal the disk-synced tensors bit for bit, and the two engines' log-probs and seeded samples
must be identical, at step 0 and after the step.
"""
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_pz.parallel import spawn_local
from megatron_pz.rollout.launcher import API_KEY_ENV

pytestmark = pytest.mark.multiproc
PROMPTS = [[5, 17, 42, 99, 7], [250, 3, 3, 180, 64, 11, 2]]


def _prompt_logprobs(engine) -> torch.Tensor:
    """Every prompt token's log-prob and the top-5 of every position, flattened (fp32)."""
    vals = []
    for p in engine.prompt_logprobs(PROMPTS, top_k=5):
        vals += [lp for lp in p.token_logprobs if lp is not None]
        vals += [lp for row in p.top[1:] for lp, _ in row]
    return torch.tensor(vals)


def _params(seed: int):
    from megatron_pz.rollout.protocol import SamplingParams

    return SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)


def _sampled(engine):
    return [(r.response_ids, r.logprobs, r.weight_version) for group in engine.generate(PROMPTS, _params(3))
            for r in group]


KEY = "colocated-test-key"


def _unauthorised_status(url: str) -> int:
    """The status of a /generate request sent without a key."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 1}}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/generate", data=body), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _worker(hf_dir: str, tp: int, pp: int, out_dir: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_pz import checkpoint as ckpt
    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.config import OptimConfig, load_config
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.weights import read_safetensors_dir
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model, unwrap
    from megatron_pz.parallel import ParallelConfig, data_owner_rank, init_distributed
    from megatron_pz.rollout.protocol import fill_sample
    from megatron_pz.trainer import colocate
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.trainer.optimizer import setup_training
    from megatron_pz.trainer.step import train_step
    from megatron_pz.types import Sample, Status, Task
    from megatron_pz.weight_sync import DiskWeightSync, InMemoryWeightSync
    from megatron_pz.weight_sync.publisher import WeightPublisher

    torch.set_num_threads(1)
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(par)
    rank = torch.distributed.get_rank()
    out = Path(out_dir)
    arch = ModelArch.from_hf_config(hf_dir)
    chunks = build_model(arch, ModelConfig(dtype="fp32"), par)
    load_hf_into_model(chunks, HFCheckpoint(hf_dir).get, arch)
    training = setup_training(chunks, OptimConfig(lr=1e-2, lr_warmup_steps=0, use_distributed_optimizer=True), 2)
    training.optimizer.reload_model_params()
    if rank == 0:  # what trainer/setup.write_hf_meta writes
        (out / ckpt.RUN_HF_META_DIR).mkdir(parents=True)
        (out / ckpt.RUN_HF_META_DIR / "config.json").write_text(__import__("json").dumps(arch.to_hf_config()))
    torch.distributed.barrier()
    cfg = load_config(None, ["rollout.colocate=true", "model.dtype=fp32", f"parallel.tensor_model_parallel_size={tp}",
                             f"parallel.pipeline_model_parallel_size={pp}"])
    spans_nodes = pp > 1
    if spans_nodes:
        colocate._spans_nodes = lambda: True  # the other rank "on another node": it must reach rank 0 by name
    else:
        os.environ[API_KEY_ENV] = KEY  # what a Slurm job exports for servers and trainer alike
    weights = WeightPublisher(arch, torch.float32)
    run = SimpleNamespace(cfg=cfg, out=out, arch=arch, chunks=[unwrap(m) for m in training.model], weights=weights,
                          is_data_owner=rank == data_owner_rank())
    # collective: the initial export, the URL (and key) broadcast
    engine = colocate.connect_colocated(cfg, out, weights, run.chunks, run.is_data_owner)
    run.engine = engine.pool
    writer = DiskWeightSync(None, out / "weights", hf_config_dir=out / ckpt.RUN_HF_META_DIR)
    result = {"rank": rank, "owner": run.is_data_owner, "pool": run.engine is not None}
    if rank == 0:
        server = engine.colocated
        result["auth"] = {"host": server.config.host, "url": run.engine.clients[0].base_url,
                          "key": server.config.api_key, "status_without_key": _unauthorised_status(server.url)}

    def disk_synced(version: int) -> Path | None:
        """The disk sync's folder of the current weights (collective export, rank 0 writes)."""
        state = run.weights.export(run.chunks)
        return writer.write(state.items(), version)[0] if rank == 0 else None

    folder = disk_synced(0)
    if rank == 0:
        colocated = run.weights.sync.engine
        result["strategy"] = type(run.weights.sync).__name__
        result["server_is_local"] = engine.colocated is not None
        disaggregated = EmbeddedEngine(folder, dtype="float32")  # what the launched server loads
        result["step0"] = (_prompt_logprobs(colocated), _prompt_logprobs(disaggregated))
        result["sampled0"] = (_sampled(run.engine), _sampled(disaggregated))  # the colocated one over HTTP
        results = run.engine.generate(PROMPTS, _params(11))
        samples = []
        for i, (ids, group) in enumerate(zip(PROMPTS, results)):
            for j, r in enumerate(group):
                s = fill_sample(Sample(task=Task.MASK_PRED, group_id=f"g{i}", prompt_ids=list(ids)), r)
                s.status, s.advantage = Status.COMPLETED, 1.0 if j == 0 else -1.0
                samples.append(s)
        box = [samples]
    else:
        result["strategy"] = type(run.weights.sync).__name__
        box = [None]
    torch.distributed.broadcast_object_list(box, src=0)
    mbs = build_microbatches(box[0], micro_batch_size=4, seq_multiple=8, same_length=pp > 1)
    result["metrics"] = train_step(training, mbs, LossConfig(), arch.vocab_size, 1.0)
    result["version"] = run.weights.push(run.chunks)  # collective: export, then the in-memory copy on rank 0
    folder = disk_synced(1)
    if rank == 0:
        assert isinstance(run.weights.sync, InMemoryWeightSync)
        report = run.weights.last_report
        result["report"] = (report.num_tensors, report.num_bytes, report.num_params, report.path)
        on_disk = read_safetensors_dir(folder)
        held = colocated.model.state_dict()
        result["names"] = (sorted(on_disk), sorted(held))
        result["unequal"] = [n for n, t in on_disk.items() if not torch.equal(held[n], t)]
        result["moved"] = [n for n, t in on_disk.items() if not torch.equal(t, disaggregated.model.state_dict()[n])]
        disaggregated.update_weights_from_disk(str(folder), 1)
        result["step1"] = (_prompt_logprobs(colocated), _prompt_logprobs(disaggregated))
        result["sampled1"] = (_sampled(run.engine), _sampled(disaggregated))
    weights.close()
    engine.close()
    if ps.is_pipeline_last_stage() or rank == 0:
        torch.save(result, out / f"result.{rank}.pt")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_colocated_engine_copy_equals_the_disk_sync(tiny_qwen3_hf, tmp_path, tp, pp, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    if pp > 1:
        try:
            socket.gethostbyname(socket.gethostname())
        except OSError:
            pytest.skip("this machine's host name does not resolve: a server named by it cannot be reached")
    spawn_local(_worker, 2, (tiny_qwen3_hf, tp, pp, str(tmp_path)))
    r = torch.load(tmp_path / "result.0.pt", weights_only=False)
    other = torch.load(tmp_path / "result.1.pt", weights_only=False)
    assert r["strategy"] == "InMemoryWeightSync" and r["server_is_local"] and r["owner"]
    auth = r["auth"]
    assert auth["status_without_key"] == 401  # refused without the key; the pool (which sends it) is served below
    if pp == 1:  # one node: loopback, with the key from the environment
        assert auth["host"] == "127.0.0.1" and auth["key"] == KEY
    else:  # ranks on several nodes: every interface, a key generated for the run, reached by host name
        assert auth["host"] == "0.0.0.0" and auth["key"] and auth["key"] != KEY
        assert auth["url"].startswith(f"http://{socket.gethostname()}:")
    assert other["strategy"] == "NoneType" and not other["owner"] and not other["pool"]  # one data owner, rank 0
    # step 0: the engine's copy of the gathered export computes exactly what the disk-loaded engine computes
    assert torch.equal(*r["step0"])
    assert r["sampled0"][0] == r["sampled0"][1]
    assert all(v == 0 for _, _, v in r["sampled0"][0])
    # a real update, pushed as version 1 on both ranks
    last = r if pp == 1 else other  # the loss is reported on the last stage
    assert last["metrics"]["train/update_skipped"] == 0 and last["metrics"]["train/grad_norm"] > 0
    assert r["version"] == other["version"] == 1
    # the in-memory copy is the disk-synced weights, bit for bit, for every tensor, and the step moved them
    on_disk, held = r["names"]
    assert on_disk and set(on_disk) <= set(held)
    assert r["unequal"] == []
    assert len(r["moved"]) > len(on_disk) // 2
    n_tensors, n_bytes, n_params, path = r["report"]
    assert n_tensors == len(on_disk) and n_bytes == 4 * n_params and path is None  # fp32, nothing written
    assert torch.equal(*r["step1"])
    assert (r["step1"][0] - r["step0"][0]).abs().max() > 1e-4
    assert r["sampled1"][0] == r["sampled1"][1]
    assert all(v == 1 for _, _, v in r["sampled1"][0])  # served over HTTP as version 1
