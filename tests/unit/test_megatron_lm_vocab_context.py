"""Continuing from a Megatron-LM checkpoint: the true vocabulary, longer context by rope interpolation, the
context check, and the rollout engine never sampling Megatron's padded vocabulary rows."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from megatron_pz.checkpoint.vocab import named_tokenizer, true_vocab_size
from megatron_pz.errors import CheckpointError, ConfigError
from megatron_pz.model.arch import ModelArch
from megatron_pz.model.context import extend_context, parse_rope_scaling

WHERE = Path("/ckpt/iter_0000010")


def mlm_args(**kw):
    """The model part of the argparse namespace Megatron-LM's pretrain_gpt.py saves (SmolLM2-135M-like)."""
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, group_query_attention=True,
                num_query_groups=2, kv_channels=None, padded_vocab_size=49280, make_vocab_size_divisible_by=128,
                tensor_model_parallel_size=1, vocab_size=None, tokenizer_type="HuggingFaceTokenizer",
                tokenizer_model=None, max_position_embeddings=512, seq_length=512, position_embedding_type="rope",
                rotary_base=10000, normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=False,
                norm_epsilon=1e-5)
    base.update(kw)
    return argparse.Namespace(**base)


# ----------------------------------------------------------------------------- true vocabulary
def test_vocab_resolution_order():
    args = mlm_args()
    # explicit beats everything; the saved args.vocab_size beats the tokenizer; the tokenizer is the last resort
    assert true_vocab_size(mlm_args(vocab_size=49200), WHERE, explicit=49152, tokenizer_size=49000) == 49152
    assert true_vocab_size(mlm_args(vocab_size=49152), WHERE, tokenizer_size=49000) == 49152
    assert true_vocab_size(args, WHERE, tokenizer_size=49152) == 49152
    # NullTokenizer --vocab-size 49152 pads 49153 (its end-of-document id) to 49280: the true vocab is 49152
    assert true_vocab_size(mlm_args(vocab_size=49152, tokenizer_type="NullTokenizer"), WHERE) == 49152
    assert true_vocab_size({"padded_vocab_size": 384, "vocab_size": 300}, WHERE) == 300  # a dict works too


def test_vocab_errors_name_the_fix():
    with pytest.raises(CheckpointError, match=r"policy\.vocab_size.*--vocab-size.*policy\.tokenizer") as e:
        true_vocab_size(mlm_args(), WHERE)
    assert "49280" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"larger than the checkpoint's embedding \(49280 rows\)"):
        true_vocab_size(mlm_args(), WHERE, tokenizer_size=50000, tokenizer_from="the tokenizer at /t")


def test_vocab_that_pads_differently_is_allowed_with_a_warning(caplog):
    # 49000 pads to 49024 at a multiple of 128, not to 49280: probably not the training tokenizer
    assert true_vocab_size(mlm_args(), WHERE, tokenizer_size=49000) == 49000
    assert "pads to 49024, not to the checkpoint's 49280" in caplog.text
    caplog.clear()
    assert true_vocab_size(mlm_args(), WHERE, tokenizer_size=49152) == 49152  # 49152 + NullTokenizer's eod
    assert "pads to" not in caplog.text


def test_named_tokenizer_is_local_only(tmp_path):
    assert named_tokenizer(mlm_args(tokenizer_model=str(tmp_path))) == tmp_path
    assert named_tokenizer(mlm_args(tokenizer_model="HuggingFaceTB/SmolLM2-135M")) is None  # a Hub name
    assert named_tokenizer(mlm_args()) is None


def test_arch_from_args_keeps_true_vocab_and_the_padded_embedding():
    arch = ModelArch.from_megatron_args(mlm_args(), vocab_size=49152)
    # 49152 alone pads to 49152; the model keeps the checkpoint's 49280 rows (and pads them further at TP=2,
    # exactly as Megatron-LM pads 49153 at TP=2: 49408)
    assert arch.vocab_size == 49152 and arch.padded_vocab_size(1) == 49280 and arch.padded_vocab_size(2) == 49408
    assert arch.num_parameters == ModelArch.from_dict({**arch.to_dict(), "min_padded_vocab_size": None}).num_parameters
    assert arch.to_hf_config()["vocab_size"] == 49152
    unpadded = ModelArch.from_megatron_args(mlm_args(padded_vocab_size=49152), vocab_size=49152)
    assert unpadded.min_padded_vocab_size is None
    assert arch.max_position_embeddings == 512


# ----------------------------------------------------------------------------- longer context
def test_parse_rope_scaling():
    assert parse_rope_scaling(None) is None
    assert parse_rope_scaling({"type": "linear", "factor": 4}) == 4.0
    assert parse_rope_scaling({"rope_type": "linear", "factor": 2.5}) == 2.5  # HF's spelling
    for bad, msg in (({"type": "yarn", "factor": 4}, r"policy\.rope_scaling\.type='yarn' is not supported"),
                     ({"type": "linear", "factor": 1}, r"policy\.rope_scaling\.factor must be a number > 1"),
                     ({"type": "linear"}, r"factor must be a number > 1, got None"),
                     ({"type": "linear", "factor": 2, "beta": 1}, r"unknown keys \['beta'\]"),
                     (4.0, r"policy\.rope_scaling must be a mapping")):
        with pytest.raises(ConfigError, match=msg):
            parse_rope_scaling(bad)


def test_policy_rope_scaling_is_checked_when_the_config_loads():
    from megatron_pz.config import PolicyConfig

    assert PolicyConfig(rope_scaling={"type": "linear", "factor": 2}).rope_scaling["factor"] == 2
    with pytest.raises(ConfigError, match="policy.rope_scaling.type"):
        PolicyConfig(rope_scaling={"type": "ntk", "factor": 2})


def test_extend_context_multiplies_the_context_once():
    arch = ModelArch.from_megatron_args(mlm_args(), vocab_size=49152)
    long = extend_context(arch, 4.0)
    assert long.max_position_embeddings == 2048 and long.rope_interpolation_factor == 4.0
    assert extend_context(long, 4.0) is long  # a checkpoint of an extended run: not 8192
    assert extend_context(arch, None) is arch
    with pytest.raises(ConfigError, match=r"already interpolates positions by 4; set policy\.rope_scaling\.factor=4"):
        extend_context(long, 2.0)
    llama3 = ModelArch.from_dict({**arch.to_dict(), "rope_scaling_factor": 8.0})
    with pytest.raises(ConfigError, match="Llama-3 rope scaling"):
        extend_context(llama3, 2.0)


@pytest.mark.parametrize("legacy", [False, True])
def test_linear_scaling_round_trips_through_hf_config(legacy):
    arch = extend_context(ModelArch.from_megatron_args(mlm_args(), vocab_size=49152), 4.0)
    if legacy:  # a transformers<5 config.json: rope_theta + rope_scaling at the top level
        arch = ModelArch.from_dict({**arch.to_dict(), "hf_config": {"rope_theta": 10000.0}})
    cfg = arch.to_hf_config()
    scaling = cfg["rope_scaling"] if legacy else cfg["rope_parameters"]
    assert scaling["rope_type"] == "linear" and scaling["factor"] == 4.0
    assert cfg["vocab_size"] == 49152 and cfg["max_position_embeddings"] == 2048
    back = ModelArch.from_hf_config(cfg)
    assert back.rope_interpolation_factor == 4.0 and back.max_position_embeddings == 2048
    # ... and transformers reads the same scaling (what the rollout engine and SGLang run)
    from transformers import LlamaConfig

    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0


def test_linear_scaling_round_trips_through_megatron_lm_args():
    from megatron_pz.checkpoint.layout import megatron_lm_args

    arch = extend_context(ModelArch.from_megatron_args(mlm_args(), vocab_size=49152), 2.0)
    args = megatron_lm_args(arch, tp=1, pp=1, dtype=torch.float32)
    assert args.rotary_seq_len_interpolation_factor == 2.0 and args.max_position_embeddings == 1024
    back = ModelArch.from_megatron_args(args, vocab_size=49152)
    assert back.rope_interpolation_factor == 2.0 and back.max_position_embeddings == 1024
    # Megatron-LM's own --rotary-seq-len-interpolation-factor (an int there)
    assert ModelArch.from_megatron_args(mlm_args(rotary_seq_len_interpolation_factor=2),
                                        vocab_size=49152).rope_interpolation_factor == 2.0


# ----------------------------------------------------------------------------- context check
def _cfg(**over):
    from megatron_pz.config import RunConfig

    cfg = RunConfig()
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_context_check_names_context_template_and_fixes():
    from megatron_pz.trainer.setup import validate_lengths

    arch = ModelArch.from_megatron_args(mlm_args(), vocab_size=49152)  # 512-token context
    cfg = _cfg(corpus__max_prompt_tokens=400, train__max_response_tokens=256)
    with pytest.raises(ConfigError) as e:
        validate_lengths(cfg, arch, template_tokens=90)
    msg = str(e.value)
    assert "\n" not in msg
    # 400 + 256 = 656 > 512; the smallest quarter factor that fits 656 in 512 is 1.5 (656/512 = 1.28 -> 1.5)
    for part in ("max_prompt_tokens (400", "response cap (256) = 656", "context of 512 tokens", "template takes 90",
                 "corpus.max_prompt_tokens", "train.max_response_tokens",
                 "policy.rope_scaling={type: linear, factor: 1.5}"):
        assert part in msg, (part, msg)
    validate_lengths(cfg, extend_context(arch, 1.5), template_tokens=90)  # 768 tokens: fits
    # an already extended model: the suggested factor counts from the pretrained 512, not from its 640
    with pytest.raises(ConfigError, match=r"context of 640 tokens \(max_position_embeddings, rope interpolation "
                                          r"x1\.25\).*factor: 1\.5\}$"):
        validate_lengths(cfg, extend_context(arch, 1.25), template_tokens=90)
    llama3 = ModelArch.from_dict({**arch.to_dict(), "rope_scaling_factor": 8.0})
    with pytest.raises(ConfigError) as e:
        validate_lengths(cfg, llama3, template_tokens=90)
    assert "rope_scaling" not in str(e.value) and str(e.value).endswith("rollout.pred_max_new_tokens")
    validate_lengths(_cfg(corpus__max_prompt_tokens=256, train__max_response_tokens=256), arch, 90)


def test_context_check_refuses_a_template_that_leaves_no_room():
    from megatron_pz.trainer.setup import validate_lengths

    arch = ModelArch.from_megatron_args(mlm_args(), vocab_size=49152)
    cfg = _cfg(corpus__max_prompt_tokens=128, train__max_response_tokens=64)
    need = 128 - cfg.corpus.prompt_margin_tokens - cfg.corpus.min_paragraph_tokens
    validate_lengths(cfg, arch, template_tokens=need)  # exactly room for the shortest paragraph
    with pytest.raises(ConfigError, match=rf"prompt template alone takes {need + 1} tokens.*raise "
                                          rf"corpus\.max_prompt_tokens to at least 129 \(the context is 512 tokens\)"):
        validate_lengths(cfg, arch, template_tokens=need + 1)


def test_a_template_that_cannot_fit_the_context_names_rope_scaling():
    """No prompt cap helps when template + margin + shortest paragraph + the longest response exceed the context:
    the error names the way out, a linear rope factor that fits them (or, under Llama-3 rope scaling, shorter
    responses)."""
    from megatron_pz.trainer.setup import validate_lengths

    arch = ModelArch.from_megatron_args(mlm_args(), vocab_size=49152)  # 512 tokens
    cfg = _cfg(corpus__max_prompt_tokens=128, train__max_response_tokens=64)
    template = 600 - cfg.corpus.prompt_margin_tokens - cfg.corpus.min_paragraph_tokens  # needs 600 + 64 = 664
    with pytest.raises(ConfigError) as e:
        validate_lengths(cfg, arch, template_tokens=template)
    msg = str(e.value)
    assert f"prompt template alone takes {template} tokens" in msg and "raise corpus.max_prompt_tokens" not in msg
    assert msg.endswith("policy.rope_scaling={type: linear, factor: 1.5} and corpus.max_prompt_tokens >= 600"), msg
    validate_lengths(_cfg(corpus__max_prompt_tokens=600, train__max_response_tokens=64), extend_context(arch, 1.5),
                     template_tokens=template)  # the suggested factor and cap fit: 664 <= 768
    llama3 = ModelArch.from_dict({**arch.to_dict(), "rope_scaling_factor": 8.0})
    with pytest.raises(ConfigError, match=r"rope_scaling" + "|" + r"lower train\.max_response_tokens") as e:
        validate_lengths(cfg, llama3, template_tokens=template)
    assert "policy.rope_scaling" not in str(e.value) and "lower train.max_response_tokens" in str(e.value)


# ----------------------------------------------------------------------------- engine: padded rows never sampled
def test_mask_padded_vocab():
    from megatron_pz.engine.generation import mask_padded_vocab

    scores = torch.tensor([[1.0, 2.0, 9.0, 7.0]])
    assert torch.equal(mask_padded_vocab(scores, 2), torch.tensor([[1.0, 2.0, float("-inf"), float("-inf")]]))
    assert mask_padded_vocab(scores, 4) is scores and mask_padded_vocab(scores, None) is scores
    assert scores[0, 2] == 9.0  # the caller's tensor is not modified


@pytest.fixture(scope="module")
def padded_lm(tiny):
    """The tiny engine model with 4 extra embedding rows whose logits dominate every position, and true vocab 260."""
    from megatron_pz.engine.model import load_model

    lm = load_model(tiny, vocab_size=256)  # the 4 special tokens play the padding rows
    head = lm.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[256:] = 1e4
    lm.model.lm_head = biased.requires_grad_(False)
    return lm


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
                                    dict(temperature=1.0, top_k=5)], ids=["greedy", "sample", "top_p", "top_k"])
def test_engine_never_samples_padded_rows(padded_lm, params, one_thread):
    from megatron_pz.engine.generation import generate_rows
    from megatron_pz.rollout.protocol import SamplingParams

    sp = SamplingParams(max_new_tokens=6, ignore_eos=True, seed=0, **params)
    out = generate_rows(padded_lm, [[10, 20, 30]] * 3, sp, version=0, eos_token_ids=set(), abort=None)
    for r in out:
        assert len(r.response_ids) == 6 and all(t < 256 for t in r.response_ids), r.response_ids
        # the reported log-prob is over the true vocabulary only (the padded rows would make it ~ -1e4)
        assert all(-50 < lp <= 0 for lp in r.logprobs), r.logprobs
    # and it equals log softmax over the first 256 logits, computed independently
    r = out[0]
    ids = torch.tensor([[10, 20, 30] + r.response_ids])
    with torch.no_grad():
        logits = padded_lm.model(ids).logits[0, 2:-1, :256].float()
    t = params["temperature"]
    ref = torch.log_softmax(logits / t if t > 0 else logits, -1).gather(1, torch.tensor(r.response_ids)[:, None])
    assert torch.allclose(torch.tensor(r.logprobs), ref.squeeze(1), atol=1e-4)


def test_prompt_logprobs_skip_padded_rows(padded_lm, one_thread):
    from megatron_pz.engine.generation import prompt_logprobs

    out = prompt_logprobs(padded_lm, [10, 20, 30, 40], top_k=3)
    assert all(-50 < lp <= 0 for lp in out.token_logprobs[1:])
    assert all(i < 256 for row in out.top[1:] for _, i in row)


def test_load_model_refuses_a_vocab_past_the_embedding(tiny):
    from megatron_pz.engine.model import load_model

    with pytest.raises(ConfigError, match=r"vocab_size=999 must be in \[1, 260\]"):
        load_model(tiny, vocab_size=999)


# ----------------------------------------------------------------------------- read_arch on a checkpoint folder
def _fake_megatron_lm_checkpoint(root: Path, args) -> Path:
    """The files ``read_arch`` reads: tracker, iteration folder with torch_dist markers, common.pt with args."""
    it = root / "iter_0000100"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    (it / ".metadata").write_bytes(b"")
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 100}, it / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("100")
    return root


def test_read_arch_null_tokenizer_49152_keeps_49280_rows_and_exports_49152(tmp_path):
    from megatron_pz import checkpoint as ckpt

    root = _fake_megatron_lm_checkpoint(tmp_path / "ckpt", mlm_args(vocab_size=49152, tokenizer_type="NullTokenizer"))
    arch = ckpt.read_arch(root)  # no tokenizer needed: args.vocab_size
    assert arch.vocab_size == 49152 and arch.padded_vocab_size(1) == 49280
    assert arch.to_hf_config()["vocab_size"] == 49152
    assert ckpt.read_arch(root, vocab_size=49000).vocab_size == 49000  # an explicit size wins


def test_read_arch_uses_the_tokenizer_the_args_name(tmp_path):
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.source import ModelSource, tokenizer_dir
    from tiny_llama import make_byte_tokenizer

    tok = tmp_path / "tok"
    make_byte_tokenizer().save_pretrained(str(tok))  # 260 tokens
    root = _fake_megatron_lm_checkpoint(tmp_path / "ckpt", mlm_args(padded_vocab_size=384, tokenizer_model=str(tok)))
    assert ckpt.read_arch(root).vocab_size == 260
    assert tokenizer_dir(ModelSource(kind="mcore", path=root)) == tok  # training loads the same tokenizer
    assert ckpt.read_arch(root, tokenizer_size=300).vocab_size == 300  # a tokenizer the caller loaded wins
    bare = _fake_megatron_lm_checkpoint(tmp_path / "bare", mlm_args(padded_vocab_size=384))
    assert tokenizer_dir(ModelSource(kind="mcore", path=bare)) is None
    with pytest.raises(CheckpointError, match=r"only the padded vocabulary \(384\).*set policy\.vocab_size"):
        ckpt.read_arch(bare)
    assert ckpt.read_arch(bare, tokenizer=tok).vocab_size == 260
