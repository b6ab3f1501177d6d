"""Continuing from a checkpoint as Megatron-LM's pretrain_gpt.py writes it: torch_dist, padded vocabulary (260
tokens padded to 384 rows, the padded rows random and large, as nothing trains them down), the tokenizer only
named by ``args.tokenizer_model``, and a short (64-token) context.

* ``megatron-pz convert --from mcore --to hf`` without ``--vocab-size`` exports the 260 true rows, with the
  tokenizer, and the HF logits equal Megatron's;
* with ``--rope-linear-factor 4`` the export runs at 256 tokens, and the rollout engine's prompt log-probs at
  200 tokens equal Megatron's log-probs with ``policy.rope_scaling={type: linear, factor: 4}`` (the on-policy
  check at the longer length);
* without a tokenizer or a saved ``vocab_size`` the architecture is refused with the key to set.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_pz.parallel import spawn_local

pytestmark = pytest.mark.multiproc

TRUE_VOCAB, PADDED, CONTEXT = 260, 384, 64


def _megatron_lm_args(tokenizer_dir: str) -> argparse.Namespace:
    """The args pretrain_gpt.py saves (the model part, plus the tokenizer and training keys it always has)."""
    return argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, kv_channels=16, padded_vocab_size=PADDED, vocab_size=None,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_dir, max_position_embeddings=CONTEXT,
        seq_length=CONTEXT, position_embedding_type="rope", rotary_base=10000, use_rope_scaling=False,
        normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, untie_embeddings_and_output_weights=True,
        add_qkv_bias=False, add_bias_linear=False, qk_layernorm=False, bf16=False, fp16=False,
        ckpt_format="torch_dist", micro_batch_size=1, global_batch_size=8, lr=3e-4, train_iters=10)


def _write_worker(root: str, tokenizer_dir: str) -> None:
    """A Megatron-LM-style checkpoint: GPTModel at the padded vocabulary, saved by dist_checkpointing with args."""
    from megatron.core import dist_checkpointing

    from megatron_pz.model.arch import ModelArch
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    args = _megatron_lm_args(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(ModelArch.from_megatron_args(args, vocab_size=PADDED), ModelConfig(dtype="fp32"))[0]
    with torch.no_grad():  # padded output rows that would win every argmax were they not masked
        model.output_layer.weight[TRUE_VOCAB:] = 3.0
    it = Path(root) / "iter_0000010"
    it.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0,
                             "iteration": 10}, str(it))
    (Path(root) / "latest_checkpointed_iteration.txt").write_text("10")


def _logprobs_worker(root: str, ids_path: str, factor: float | None, out_path: str) -> None:
    """Megatron's log-probs of ``ids``, the model built as training builds it (true vocab, optional rope scaling)."""
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.model.context import extend_context
    from megatron_pz.model.forward import forward_logits
    from megatron_pz.model.provider import ModelConfig, build_model
    from megatron_pz.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    arch = extend_context(ckpt.read_arch(root), factor)  # the vocabulary from the tokenizer args name
    assert arch.vocab_size == TRUE_VOCAB and arch.padded_vocab_size(1) == PADDED, arch
    model = build_model(arch, ModelConfig(dtype="fp32"))
    assert model[0].output_layer.weight.shape[0] == PADDED  # the model keeps its padded embedding
    ckpt.load(root, model, arch)
    logits = forward_logits(model, torch.load(ids_path), arch.vocab_size)
    torch.save(torch.log_softmax(logits.float(), -1), out_path)


@pytest.fixture(scope="module")
def megatron_lm_ckpt(tmp_path_factory):
    from tiny_llama import make_byte_tokenizer

    base = tmp_path_factory.mktemp("megatron_lm")
    tok = base / "tokenizer"
    make_byte_tokenizer().save_pretrained(str(tok))
    root = base / "ckpt"
    spawn_local(_write_worker, 1, (str(root), str(tok)))
    return root, tok


def _megatron_logprobs(tmp_path, root, ids, factor=None):
    ids_path, out = tmp_path / "ids.pt", tmp_path / f"logp_{factor}.pt"
    torch.save(ids, ids_path)
    spawn_local(_logprobs_worker, 1, (str(root), str(ids_path), factor, str(out)))
    return torch.load(out)


def _convert(*args):
    proc = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "convert", "--from", "mcore", "--to", "hf",
                           *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_export_writes_the_true_vocabulary_and_matches_megatron(megatron_lm_ckpt, tmp_path):
    from megatron_pz.engine.generation import generate_rows, prompt_logprobs
    from megatron_pz.engine.model import load_model
    from megatron_pz.rollout.protocol import SamplingParams

    root, _ = megatron_lm_ckpt
    out = tmp_path / "hf"
    _convert(root, out)  # no --vocab-size: the tokenizer the args name says 260
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == TRUE_VOCAB and cfg["max_position_embeddings"] == CONTEXT
    assert (out / "tokenizer.json").exists()  # the named tokenizer travels with the export
    lm = load_model(out)
    assert lm.model.lm_head.weight.shape[0] == TRUE_VOCAB and len(lm.tokenizer) == TRUE_VOCAB
    ids = torch.randint(0, TRUE_VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = _megatron_logprobs(tmp_path, root, ids)[0, :-1]
    got = prompt_logprobs(lm, ids[0].tolist(), top_k=0)
    diff = (torch.tensor(got.token_logprobs[1:]) - ref.gather(1, ids[0, 1:, None]).squeeze(1)).abs().max()
    assert diff < 1e-4, diff
    # greedy generation from the export stays inside the true vocabulary
    res = generate_rows(lm, [ids[0, :8].tolist()], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True),
                        0, set(), None)
    assert all(t < TRUE_VOCAB for t in res[0].response_ids)


@pytest.mark.slow
def test_longer_context_with_linear_rope_scaling_matches_megatron(megatron_lm_ckpt, tmp_path):
    from megatron_pz.engine.generation import prompt_logprobs
    from megatron_pz.engine.model import load_model

    root, _ = megatron_lm_ckpt
    out = tmp_path / "hf_x4"
    _convert(root, out, "--rope-linear-factor", 4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 4 * CONTEXT
    assert {cfg["rope_parameters"]["rope_type"], cfg["rope_parameters"]["factor"]} == {"linear", 4.0}
    ids = torch.randint(0, TRUE_VOCAB, (1, 200), generator=torch.Generator().manual_seed(1))  # > 64 tokens
    ref = _megatron_logprobs(tmp_path, root, ids, factor=4.0)[0, :-1].gather(1, ids[0, 1:, None]).squeeze(1)
    got = torch.tensor(prompt_logprobs(load_model(out), ids[0].tolist(), top_k=0).token_logprobs[1:])
    diff = (got - ref).abs()
    print(f"engine vs Megatron at 200 tokens, linear x4: max |dlogp| {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.max() < 1e-4, diff.max()
    # the check can fail: the unscaled model computes other log-probs at these positions
    plain = tmp_path / "hf_plain"
    _convert(root, plain)
    unscaled = torch.tensor(prompt_logprobs(load_model(plain), ids[0].tolist(), top_k=0).token_logprobs[1:])
    # (a random tiny model depends on positions only faintly: 1.7e-3 here, still 10x the tolerance above)
    assert (unscaled - ref).abs().max() > max(10 * diff.max(), 1e-3)


def test_without_tokenizer_or_vocab_size_the_error_names_the_key(megatron_lm_ckpt, tmp_path):
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.errors import CheckpointError

    root, tok = megatron_lm_ckpt
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    moved = tmp_path / "tokenizer_moved"
    shutil.copytree(tok, moved)
    shutil.rmtree(tok)
    try:
        with pytest.raises(CheckpointError, match=r"padded vocabulary \(384\).*set policy\.vocab_size"):
            ckpt.read_arch(copy)
        assert ckpt.read_arch(copy, vocab_size=TRUE_VOCAB).vocab_size == TRUE_VOCAB
        assert ckpt.read_arch(copy, tokenizer=moved).vocab_size == TRUE_VOCAB
        assert ckpt.read_arch(copy, tokenizer_size=TRUE_VOCAB).padded_vocab_size(1) == PADDED
    finally:
        shutil.copytree(moved, tok)


def _train(out, load, *extra):
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "megatron_pz.cli", "train", "--config", str(repo / "examples/quickstart_cpu.yaml"),
           f"policy.load={load}", f"output_dir={out}", "logging.progress_bar=false", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)


def test_training_checks_the_context_then_runs_longer_with_rope_scaling(megatron_lm_ckpt, tmp_path):
    """The 64-token checkpoint under a ~600-token byte-level prompt template: one-line errors before any model
    is built, then one step at 13 x the context whose on-policy check (engine vs Megatron log-probs) holds."""
    root, _ = megatron_lm_ckpt
    p = _train(tmp_path / "a", root, "corpus.max_prompt_tokens=200")
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()[-1]
    # 589 tokens of template cannot fit a 64-token context whatever the prompt cap: the error names the rope factor
    assert "prompt template alone takes 589 tokens" in err and "policy.rope_scaling={type: linear" in err, err
    p = _train(tmp_path / "b", root, "corpus.max_prompt_tokens=800")
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "context of 64 tokens" in err and "of which the prompt template takes 589" in err
    assert "policy.rope_scaling={type: linear, factor: 14}" in err, err  # (800 + 96) / 64 = 14

    out = tmp_path / "c"
    p = _train(out, root, "corpus.max_prompt_tokens=800", "policy.rope_scaling={type: linear, factor: 13}",
               "train.steps=1", "train.paragraphs_per_step=2", "train.masks_per_paragraph=2",
               "train.predictions_per_mask=4", "rollout.gen_max_new_tokens=16", "rollout.pred_max_new_tokens=12",
               "train.max_response_tokens=16")
    assert p.returncode == 0, p.stderr[-3000:]
    (m,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["onpolicy/tokens"] > 0 and m["onpolicy/logprob_abs_diff_max"] < 1e-4, m
    hf = json.loads((out / "hf_meta" / "config.json").read_text())  # what the rollout engine runs
    assert hf["vocab_size"] == TRUE_VOCAB and hf["max_position_embeddings"] == 13 * CONTEXT
    assert hf["rope_parameters"]["rope_type"] == "linear" and hf["rope_parameters"]["factor"] == 13.0
    arch = json.loads((out / "checkpoints" / "iter_0000001" / "megatron_pz.json").read_text())["arch"]
    assert (arch["vocab_size"], arch["rope_interpolation_factor"]) == (TRUE_VOCAB, 13.0)
