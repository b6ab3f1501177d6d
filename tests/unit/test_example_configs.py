"""Every examples/*.yaml loads; the paper-scale runs carry the paper's values and a layout their model allows.

The architectures are the documented HF ``config.json`` values of each base model (hard-coded: no download),
so a typo in a TP/PP/EP size, a world size the batch cannot be split over, or a lost paper value fails here.
"""
import dataclasses
from pathlib import Path

import pytest

from megatron_pz.config import load_config
from megatron_pz.model import provider
from megatron_pz.model.arch import ModelArch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Fields of the base models' config.json that decide the Megatron layout (Qwen/Qwen3-*-Base,
# HuggingFaceTB/SmolLM3-3B-Base).
QWEN3_4B = dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
QWEN3_8B = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=32768,
                     rope_theta=1000000.0, rms_norm_eps=1e-6)
SMOLLM3_3B = dict(model_type="smollm3", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=128256, tie_word_embeddings=True,
                  max_position_embeddings=65536, rope_theta=5000000.0, rms_norm_eps=1e-6, no_rope_layer_interval=4,
                  no_rope_layers=[int((i + 1) % 4 != 0) for i in range(36)])

# file -> (HF config, training world size the file's comments plan for, objective, steps)
PAPER_RUNS = {
    "qwen3_4b_pretrainzero.yaml": (QWEN3_4B, 8, "pretrainzero", 2000),
    "qwen3_4b_random_span.yaml": (QWEN3_4B, 8, "random_span", 2000),
    "qwen3_8b_pretrainzero.yaml": (QWEN3_8B, 8, "pretrainzero", 2000),
    "qwen3_30b_a3b_pretrainzero.yaml": (QWEN3_30B_A3B, 16, "pretrainzero", 2000),
    "smollm3_3b_coldstart_random_span.yaml": (SMOLLM3_3B, 8, "random_span", 100),
    "smollm3_3b_pretrainzero.yaml": (SMOLLM3_3B, 8, "pretrainzero", 1900),
}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads(path):
    from megatron_pz.config import read_yaml
    from megatron_pz.trainer.stages import is_staged, plan_stages

    data = read_yaml(path)
    if is_staged(data):  # every stage loads as it will run, chained to the previous one
        stages = plan_stages(path, data, [])
        assert data["name"] == path.stem and len(stages) >= 2
        assert all(f"policy.load={a.output_dir / 'checkpoints'}" in b.overrides for a, b in zip(stages, stages[1:]))
        return
    cfg = load_config(path)
    assert cfg.name == path.stem


@pytest.mark.parametrize("path", sorted((EXAMPLES / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_run_loads(path):
    assert load_config(path).name == path.stem


def test_experiment_arms_differ_in_the_objective_only():
    """docs/results.md compares the two arms; a variant changes one thing (name and output folder aside)."""
    a = load_config(EXAMPLES / "experiments" / "smollm2_pretrainzero.yaml").to_dict()
    b = load_config(EXAMPLES / "experiments" / "smollm2_random_span.yaml").to_dict()
    diff = {k for k in a if a[k] != b[k]} | {f"train.{k}" for k in a["train"] if a["train"][k] != b["train"][k]}
    assert diff == {"name", "output_dir", "train", "train.objective"}


def test_every_paper_run_is_listed():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert set(PAPER_RUNS) <= names


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_values(name):
    """[PZ §4.1]: 32 x 8 x 8, lr 5e-7 cosine, 1536 / 4096 tokens, GRPO without KL, DAPO filter; bf16, SGLang."""
    _, _, objective, steps = PAPER_RUNS[name]
    cfg = load_config(EXAMPLES / name)
    t = cfg.train
    assert (t.objective, t.steps) == (objective, steps)
    assert (t.paragraphs_per_step, t.masks_per_paragraph, t.predictions_per_mask) == (32, 8, 8)
    assert (cfg.corpus.max_prompt_tokens, t.max_response_tokens) == (1536, 4096)
    assert cfg.gen_max_new_tokens == cfg.pred_max_new_tokens == 4096
    assert cfg.optim.lr == 5e-7
    # the SmolLM3 cold-start holds the peak lr (see smollm3_3b_pretrainzero.yaml); everything else is cosine
    assert cfg.optim.lr_decay_style == ("constant" if name.startswith("smollm3_3b_coldstart") else "cosine")
    assert cfg.optim.lr_decay_steps is None  # decays over the run's own steps
    assert cfg.loss.kl is None and cfg.loss.kl_coef == 0.0 and cfg.loss.eps_high > cfg.loss.eps_low
    assert cfg.advantage.dapo_filter
    assert cfg.model.dtype == "bf16" and cfg.prompt.style == "plain"
    assert (cfg.rollout.backend, cfg.rollout.weight_sync) == ("sglang", "distributed")
    assert cfg.rollout.weights_dtype == "bf16"  # pushes what the servers serve, not the embedded engine's fp32
    assert cfg.rollout.endpoints_file == f"{cfg.output_dir}/endpoints.txt"
    assert cfg.output_dir == f"runs/{cfg.name}"


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_layout_fits_the_model(name, monkeypatch):
    """TP/PP/EP valid for the architecture, the world splits the batch, the GPU TransformerConfig builds,
    sequences fit the context, and the model state fits an 80 GB GPU with room for activations."""
    hf, world, _, _ = PAPER_RUNS[name]
    cfg = load_config(EXAMPLES / name)
    arch = ModelArch.from_hf_config(hf)
    par = cfg.parallel
    arch.validate_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                           par.context_parallel_size, par.expert_model_parallel_size, par.expert_tensor_size)
    dp = cfg.validate_world(world)
    assert cfg.train.paragraphs_per_step % dp == 0
    assert cfg.corpus.max_prompt_tokens + cfg.train.max_response_tokens <= arch.max_position_embeddings
    # The configs target GPU nodes with Transformer Engine (needed for sequence parallelism and grouped GEMM).
    monkeypatch.setattr(provider, "transformer_engine_available", lambda: True)
    tcfg = provider.build_transformer_config(arch, cfg.model, par)
    assert tcfg.bf16 and tcfg.recompute_granularity == "full"
    assert _model_state_gb_per_gpu(arch, par, world) < 55


def test_moe_run_routes_like_hf():
    cfg = load_config(EXAMPLES / "qwen3_30b_a3b_pretrainzero.yaml")
    arch = ModelArch.from_hf_config(QWEN3_30B_A3B)
    assert (arch.num_experts, arch.moe_router_topk, arch.moe_norm_topk_prob) == (128, 8, True)
    par = cfg.parallel
    assert par.expert_model_parallel_size > 1 and par.sequence_parallel
    c = provider.build_transformer_config(arch, cfg.model, dataclasses.replace(par, sequence_parallel=False),
                                          training=False)  # CPU: no TE, so no sequence parallelism
    assert c.moe_router_pre_softmax is False and c.moe_router_load_balancing_type == "none"
    assert c.moe_token_dispatcher_type == "alltoall"


def test_variants_change_only_what_they_say():
    def flat(name):
        d = load_config(EXAMPLES / name).to_dict()
        return {(s, k): v for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()}

    base, rs = flat("qwen3_4b_pretrainzero.yaml"), flat("qwen3_4b_random_span.yaml")
    assert {k for k in base if base[k] != rs[k]} == {("train", "objective"), ("rollout", "endpoints_file")}

    stage2, stage1 = flat("smollm3_3b_pretrainzero.yaml"), flat("smollm3_3b_coldstart_random_span.yaml")
    assert {k for k in stage2 if stage2[k] != stage1[k]} == {
        ("train", "objective"), ("train", "steps"), ("optim", "lr_decay_style"), ("policy", "load"),
        ("policy", "tokenizer"), ("rollout", "endpoints_file")}
    # stage 2 starts from stage 1's checkpoints; together they are the paper's 2000 steps
    cold = load_config(EXAMPLES / "smollm3_3b_coldstart_random_span.yaml")
    main = load_config(EXAMPLES / "smollm3_3b_pretrainzero.yaml")
    assert main.policy.load == f"{cold.output_dir}/checkpoints"
    assert cold.train.steps + main.train.steps == 2000
    assert cold.train.steps % cold.checkpoint.save_interval == 0  # its last step is saved


def _model_state_gb_per_gpu(arch: ModelArch, par, world: int) -> float:
    """bf16 weights + fp32 grads (6 B) per local parameter + fp32 master/Adam (12 B) sharded over DP copies."""
    tp, pp, ep, etp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                       par.expert_model_parallel_size, par.expert_tensor_size)
    dp = world // (tp * pp * par.context_parallel_size)
    total = arch.num_parameters
    experts = 0
    if arch.is_moe:
        experts = arch.num_layers * arch.num_experts * 3 * arch.hidden_size * arch.moe_ffn_hidden_size
    dense_local = (total - experts) / (tp * pp)
    expert_local = experts / (ep * etp * pp)
    expert_dp = world // (ep * etp * pp)
    return (6 * (dense_local + expert_local) + 12 * dense_local / dp + 12 * expert_local / expert_dp) / 1e9


def test_smollm2_cold_start_stages_chain_and_the_stage2_arms_differ_in_the_objective_only():
    """docs/coldstart.md: stage 1 (sft_span) -> stage 2 loads its checkpoints; the two stage-2 arms are twins."""
    stage1 = load_config(EXAMPLES / "smollm2_stage1_warmup.yaml")
    rs = load_config(EXAMPLES / "smollm2_stage2_random_span.yaml")
    pz = load_config(EXAMPLES / "smollm2_stage2_pretrainzero.yaml")
    assert stage1.train.objective == "sft_span" and (rs.train.objective, pz.train.objective) == \
        ("random_span", "pretrainzero")
    assert rs.policy.load == pz.policy.load == f"{stage1.output_dir}/checkpoints"
    assert stage1.checkpoint.save_interval == 0  # the last step is saved: the one stage 2 loads
    # the same prediction task: prompt, span rules and one-word spans as in the warm-up
    assert rs.prompt == stage1.prompt and rs.span == stage1.span and rs.random_span == stage1.random_span
    # other paragraphs and span draws than the warm-up's
    assert rs.corpus.seed != stage1.corpus.seed and rs.train.seed != stage1.train.seed
    a, b = rs.to_dict(), pz.to_dict()
    diff = {k for k in a if a[k] != b[k]} | {f"train.{k}" for k in a["train"] if a["train"][k] != b["train"][k]}
    assert diff == {"name", "output_dir", "train", "train.objective"}


@pytest.mark.parametrize("variant", ["restate", "cloze"])
def test_smollm2_restate_arms_differ_in_the_objective_only_and_answer_by_continuation(variant):
    """docs/coldstart.md "Restated prompt" and "Cloze prompt": the two arms are twins; the restated prompt uses the
    continuation reward; the cloze warm-up teaches the generator only, with the arms' prompt."""
    rs = load_config(EXAMPLES / f"smollm2_{variant}_random_span.yaml")
    pz = load_config(EXAMPLES / f"smollm2_{variant}_pretrainzero.yaml")
    warm = load_config(EXAMPLES / f"smollm2_{variant}_warmup.yaml")
    assert (rs.train.objective, pz.train.objective, warm.train.objective) == ("random_span", "pretrainzero", "sft_span")
    assert rs.prompt.pred_restate and rs.reward.pred_reward == "continuation_match"
    assert warm.prompt == rs.prompt and rs.prompt.pred_cloze is (variant == "cloze")
    assert warm.sft.predictor_samples is (variant == "restate") and warm.sft.generator_samples
    a, b = rs.to_dict(), pz.to_dict()
    diff = {k for k in a if a[k] != b[k]} | {f"train.{k}" for k in a["train"] if a["train"][k] != b["train"][k]}
    assert diff == {"name", "output_dir", "train", "train.objective"}
