"""Write checkpoints under one Megatron-Core release and read them under another (run by
``test_cross_version_checkpoints.py`` with two interpreters; needs the repository on PYTHONPATH).

    python ckpt_worker.py write OUT    # under release A: OUT/{hf, ours, mlm, train} + reference tensors
    python ckpt_worker.py read OUT RESULT.json   # under release B: load each, compare, write the figures

* ``ours``: the tiny Qwen3 converted by ``megatron-pz convert`` at TP2 (our layout: megatron_pz.json + torch_dist);
  read back at TP1 and exported to HF, compared with the HF source tensor by tensor.
* ``mlm``: a Megatron-LM-layout checkpoint written with ``dist_checkpointing.save`` directly (no megatron_pz.json,
  the architecture only in the saved ``args``), as Megatron-LM's pretrain_gpt.py writes it under that release;
  read with ``checkpoint.load``, compared with the writer's tensors.
* ``train``: a training checkpoint (model + distributed-optimizer state) after one optimizer step; the reader
  resumes it and takes the second step on the same batch, compared with the writer's own second step. A fresh
  optimizer instead of the restored one is measured too, so the comparison shows it can tell them apart.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

TRUE_VOCAB = 300


def _hf_model(folder: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=TRUE_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128)
    Qwen3ForCausalLM(cfg).save_pretrained(str(folder))


def _batch():
    """One micro-batch of two rows (one sample each): a 7-token prompt, then 9 response tokens, every one trained."""
    from megatron_pz.trainer.batching import MicroBatch

    g = torch.Generator().manual_seed(1)
    b, s, prompt = 2, 16, 7
    tokens = torch.randint(0, TRUE_VOCAB, (b, s), generator=g)
    r = s - prompt
    cols = (prompt - 1 + torch.arange(r)).expand(b, r).clone()  # the logit at column t predicts token t + 1
    return [MicroBatch(tokens=tokens, position_ids=torch.arange(s).expand(b, s).clone(),
                       labels=tokens[:, prompt:].clone(), loss_mask=torch.ones(b, r),
                       advantages=torch.tensor([1.0, -1.0]), rollout_logprobs=torch.zeros(b, r),
                       rows=torch.arange(b)[:, None].expand(b, r).clone(), cols=cols)]


def _training(hf_dir: str):
    from megatron_pz.config import OptimConfig
    from megatron_pz.convert.bridge import load_hf_into_model
    from megatron_pz.convert.hf_io import HFCheckpoint
    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed
    from megatron_pz.trainer.optimizer import setup_training

    init_distributed(ParallelConfig())
    hf = HFCheckpoint(hf_dir)
    arch = ModelArch.from_hf_config(hf.config())
    model = build_model(arch, ModelConfig(dtype="fp32"))
    load_hf_into_model(model, hf.get, arch)
    return arch, setup_training(model, OptimConfig(lr=1e-3, weight_decay=0.0, lr_decay_style="constant"), 4)


def _step(state) -> None:
    from megatron_pz.algo.loss import LossConfig
    from megatron_pz.trainer.step import train_step

    out = train_step(state, _batch(), LossConfig(), TRUE_VOCAB, 1.0)
    assert out["train/grad_norm"] > 0, out


def _params(state) -> dict[str, torch.Tensor]:
    from megatron_pz.model.provider import unwrap

    return {k: v.detach().clone() for k, v in unwrap(state.model[0]).state_dict().items() if torch.is_tensor(v)}


def _write_train(hf_dir: str, root: str, ref: str) -> None:
    from megatron_pz import checkpoint as ckpt

    arch, state = _training(hf_dir)
    _step(state)
    ckpt.save(root, 1, state.model, arch, optimizer=state.optimizer, meta={"step": 1})
    _step(state)
    torch.save(_params(state), ref)


def _read_train(hf_dir: str, root: str, ref: str, out: str) -> None:
    from megatron_pz import checkpoint as ckpt

    expect = torch.load(ref)
    result = {}
    for restore in (True, False):
        arch, state = _training(hf_dir)
        ckpt.load(root, state.model, arch, optimizer=state.optimizer if restore else None)
        _step(state)
        got = _params(state)
        key = "resume_step2_max_abs_diff" if restore else "fresh_optimizer_step2_max_abs_diff"
        result[key] = max(float((got[k] - expect[k]).abs().max()) for k in expect)
    Path(out).write_text(json.dumps(result))


def _mlm_args() -> argparse.Namespace:
    """What Megatron-LM's pretrain_gpt.py saves (the model keys plus a few training ones)."""
    return argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, kv_channels=16, padded_vocab_size=384, vocab_size=TRUE_VOCAB,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        max_position_embeddings=64, seq_length=64, position_embedding_type="rope", rotary_base=10000,
        use_rope_scaling=False, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
        untie_embeddings_and_output_weights=True, add_qkv_bias=False, add_bias_linear=False, qk_layernorm=False,
        bf16=False, fp16=False, ckpt_format="torch_dist", micro_batch_size=1, global_batch_size=8, lr=3e-4,
        train_iters=10)


def _write_mlm(root: str, ref: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    args = _mlm_args()
    torch.manual_seed(0)
    model = build_model(ModelArch.from_megatron_args(args, vocab_size=TRUE_VOCAB), ModelConfig(dtype="fp32"))[0]
    it = Path(root) / "iter_0000010"
    it.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0,
                             "iteration": 10}, str(it))
    (Path(root) / "latest_checkpointed_iteration.txt").write_text("10")
    torch.save({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}, ref)


def _read_mlm(root: str, ref: str, out: str) -> None:
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    arch = ckpt.read_arch(root)  # from args alone: there is no megatron_pz.json
    model = build_model(arch, ModelConfig(dtype="fp32"))
    info, _ = ckpt.load(root, model, arch)
    expect = torch.load(ref)
    got = {k: v for k, v in model[0].state_dict().items() if torch.is_tensor(v)}
    Path(out).write_text(json.dumps({
        "iteration": info.iteration, "vocab_size": arch.vocab_size,
        "tensors": len(expect), "exact": all(torch.equal(got[k], v) for k, v in expect.items())}))


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def write(out: Path) -> None:
    from megatron_pz.convert.api import hf_to_mcore
    from megatron_pz.parallel import spawn_local

    out.mkdir(parents=True, exist_ok=True)
    _hf_model(out / "hf")
    hf_to_mcore(out / "hf", out / "ours", tp=2)
    spawn_local(_write_mlm, 1, (str(out / "mlm"), str(out / "mlm_ref.pt")))
    spawn_local(_write_train, 1, (str(out / "hf"), str(out / "train"), str(out / "train_step2.pt")))
    import megatron.core

    (out / "written_by.json").write_text(json.dumps({"megatron_core": megatron.core.__version__}))


def read(out: Path, result: Path) -> None:
    import megatron.core

    from megatron_pz.convert.api import mcore_to_hf
    from megatron_pz.parallel import spawn_local

    figures: dict = {"written_by": json.loads((out / "written_by.json").read_text())["megatron_core"],
                     "read_by": megatron.core.__version__}
    tag = figures["read_by"]
    exported = mcore_to_hf(out / "ours", out / f"ours_hf_{tag}")
    src, back = _hf_tensors(out / "hf"), _hf_tensors(exported)
    figures["ours"] = {"tensors": len(src), "same_names": sorted(src) == sorted(back),
                       "exact": sorted(src) == sorted(back) and all(torch.equal(src[k], back[k]) for k in src)}
    spawn_local(_read_mlm, 1, (str(out / "mlm"), str(out / "mlm_ref.pt"), str(out / f"mlm_{tag}.json")))
    figures["mlm"] = json.loads((out / f"mlm_{tag}.json").read_text())
    figures["mlm_export_vocab_rows"] = int(
        _hf_tensors(mcore_to_hf(out / "mlm", out / f"mlm_hf_{tag}"))["model.embed_tokens.weight"].shape[0])
    spawn_local(_read_train, 1, (str(out / "hf"), str(out / "train"), str(out / "train_step2.pt"),
                                 str(out / f"train_{tag}.json")))
    figures["train"] = json.loads((out / f"train_{tag}.json").read_text())
    result.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    else:
        read(Path(sys.argv[2]), Path(sys.argv[3]))
