"""megatron_pz.plan (memory and FLOP model) against hand-computed numbers and Korthikanti et al. 2022's formulas."""
from types import SimpleNamespace

import pytest

from megatron_pz.plan import activations, flops, params
from megatron_pz.plan.activations import layer_activation_bytes
from megatron_pz.plan.layout import Layout, Workload
from megatron_pz.plan.memory import GIB, plan_memory

# A small Llama: L=4, h=64, f=96, 4 heads of 16, 2 KV groups (q width 64, kv width 32), vocab 300, untied.
# vocab 300 pads to 384 at TP1 and 512 at TP2 (multiples of 128 x TP).
ARCH = SimpleNamespace(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                       head_dim=16, vocab_size=300, tie_word_embeddings=False, qkv_bias=False, qk_norm=False,
                       make_vocab_size_divisible_by=128)


# ------------------------------------------------------------------------------------------- Korthikanti Table 2
S, B, H, A = 2048, 1, 4096, 32
SBH = S * B * H  # 8,388,608
PAPER = dict(s=S, b=B, h=H, heads=A, q=H, kv=H, w1=4 * H, w2=4 * H, e=2, dropout=True, flash=False,
             softmax_fp32=False)  # MHA, 4h GELU MLP, 16-bit activations and softmax, dropout on


@pytest.mark.parametrize("kw, expected", [
    (dict(), SBH * (34 + 5 * A * S / H)),                                          # no parallelism: 34 + 80
    (dict(tp=8), SBH * (10 + 24 / 8 + 5 * A * S / (H * 8))),                       # TP without SP: 10 + 3 + 10
    (dict(tp=8, sp=True), SBH / 8 * (34 + 5 * A * S / H)),                          # TP + SP
    (dict(tp=8, recompute="selective"), SBH * (10 + 24 / 8)),                       # TP + selective
    (dict(tp=8, sp=True, recompute="selective"), SBH * 34 / 8),                     # TP + SP + selective
    (dict(recompute="full"), SBH * 2),                                               # full: the layer input
    (dict(tp=8, sp=True, recompute="full"), SBH * 2 / 8),
], ids=["none", "tp", "tp-sp", "tp-selective", "tp-sp-selective", "full", "full-sp"])
def test_layer_activations_reproduce_korthikanti_table2(kw, expected):
    assert layer_activation_bytes(**PAPER, **kw) == pytest.approx(expected, rel=1e-12)


def test_paper_numbers_spelled_out():
    # 2048 x 4096 x (34 + 80) = 956,301,312 bytes per layer without parallelism.
    assert layer_activation_bytes(**PAPER) == 956_301_312
    assert layer_activation_bytes(**PAPER, tp=8, sp=True, recompute="selective") == 35_651_584


def test_flash_attention_keeps_no_scores_and_gqa_widths():
    # Flash: no a*s^2 term; Q (64) + K, V at the KV width (32 each) instead of the expanded 64.
    # per token: e * (4h replicated + q + 2kv + q + w1 + w2) = 2 * (256 + 64 + 64 + 64 + 192 + 96) = 1472 B
    kw = dict(s=128, b=2, h=64, heads=4, q=64, kv=32, w1=192, w2=96, e=2)
    assert layer_activation_bytes(**kw, flash=True) == 256 * 1472
    # Unfused (Megatron's local spec): K and V repeated to q width (+2 x 32 wide x 2 B = 128 B/token), fp32
    # softmax with a 16-bit copy (4 + 2 B per score): 4 heads x 128 x 128 scores x 2 sequences x 6 B.
    unfused = layer_activation_bytes(**kw, flash=False, softmax_fp32=True)
    assert unfused == 256 * (1472 + 128) + 4 * 128 * 128 * 2 * 6


# ------------------------------------------------------------------------------------------- parameters
def test_param_counts_by_stage():
    # per layer: attention 64*(64+2*32) + 64*64 = 12288, MLP 3*64*96 = 18432, two norms 128 -> 30848
    assert params.layer_param_counts(ARCH) == (30848, 0)
    dense, expert = params.stage_param_counts(ARCH, Layout(), 0)
    assert (dense, expert) == (4 * 30848 + 384 * 64 + 384 * 64 + 64, 0)  # + embedding, output layer, final norm
    # TP2 PP2: a layer is 12288/2 + 18432/2 + 128 = 15488; embedding 512*64/2 = 16384
    lay = Layout(tp=2, pp=2, dp=2)
    assert params.stage_param_counts(ARCH, lay, 0) == (2 * 15488 + 16384, 0)
    assert params.stage_param_counts(ARCH, lay, 1) == (2 * 15488 + 64 + 16384, 0)


def test_tied_embeddings_get_a_copy_on_the_last_stage_only_with_pp():
    tied = SimpleNamespace(**{**vars(ARCH), "tie_word_embeddings": True})
    assert params.stage_param_counts(tied, Layout(), 0)[0] == 4 * 30848 + 384 * 64 + 64
    assert params.stage_param_counts(tied, Layout(pp=2), 1)[0] == 2 * 30848 + 384 * 64 + 64


def test_state_bytes_bf16_distributed_optimizer():
    plan = plan_memory(ARCH, Layout(tp=2, pp=2, dp=2), Workload(micro_batch_size=1, seq_length=64), overhead_gib=0)
    last = next(s for s in plan.stages if s.stage == 1)
    n = 2 * 15488 + 64 + 16384  # 47,424
    assert last.param_count == n
    assert (last.params, last.grads, last.optimizer) == (2 * n, 4 * n, 12 * n / 2)


def test_state_bytes_fp32_and_without_distributed_optimizer():
    n = 4 * 30848 + 2 * 384 * 64 + 64
    fp32 = plan_memory(ARCH, Layout(dp=4), Workload(1, 64, dtype="fp32"), overhead_gib=0).stages[0]
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n / 4)  # no master copy in fp32
    plain = plan_memory(ARCH, Layout(dp=4), Workload(1, 64, distributed_optimizer=False), overhead_gib=0).stages[0]
    assert plain.optimizer == 12 * n  # not sharded


def test_moe_params_via_optional_fields():
    moe = SimpleNamespace(**vars(ARCH), num_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2)
    # TP2: attention 12288/2 + norms 128 + router 8*64 (replicated) = 6784; EP4 ETP1: 2 experts x 3*64*32 = 12288
    assert params.layer_param_counts(moe, tp=2, ep=4, etp=1) == (6784, 12288)
    # expert optimizer state is sharded over expert-DP = world / (PP x EP x ETP) = 16 / 4 = 4
    lay = Layout(tp=2, dp=8, ep=4, etp=1)
    assert lay.expert_dp == 4
    st = plan_memory(moe, lay, Workload(1, 64), overhead_gib=0).stages[0]
    dense, expert = params.stage_param_counts(moe, lay, 0)
    assert st.optimizer == 12 * dense / 8 + 12 * expert / 4


# ------------------------------------------------------------------------------------------- activations, logits
WORK = Workload(micro_batch_size=2, seq_length=128)  # bf16, flash, fused SwiGLU (GPU), no recompute
PER_LAYER = 256 * 1472  # see test_flash_attention_keeps_no_scores_and_gqa_widths (w1 = 2f = 192, w2 = f = 96)
HEAD = 2 * 256 * 2 * 64  # final norm input + output layer input, e * tokens * 2h


def test_stage_activations_and_pipeline_in_flight():
    one = plan_memory(ARCH, Layout(), WORK, overhead_gib=0).stages[0]
    assert one.activations == 4 * PER_LAYER + HEAD
    pp = {s.stage: s for s in plan_memory(ARCH, Layout(pp=2), Workload(2, 128, num_microbatches=4)).stages}
    assert pp[0].activations == 2 * 2 * PER_LAYER  # 1F1B: stage 0 holds min(PP, m) = 2 micro-batches
    assert pp[1].activations == 1 * 2 * PER_LAYER + HEAD
    full = plan_memory(ARCH, Layout(), Workload(2, 128, recompute="full")).stages[0]
    assert full.activations == 4 * (2 * 256 * 64) + PER_LAYER + HEAD  # inputs + one layer recomputed


def test_logits_bytes():
    # 2 x 128 tokens x 384 padded rows; per element: bf16 logits 2 + fp32 copy 4 + saved softmax 4 + entropy 16
    # + 4 for the masked_fill copy (vocab 300 is padded at TP1)
    assert activations.logits_bytes(ARCH, Layout(), WORK) == 2 * 128 * 384 * 30
    fp32 = Workload(2, 128, dtype="fp32")
    assert activations.logits_bytes(ARCH, Layout(tp=2), fp32) == 2 * 128 * 512 / 2 * 28


def test_fits_names_the_largest_part():
    plan = plan_memory(ARCH, Layout(), WORK, overhead_gib=1.0)
    assert plan.total == plan.worst.allocated + GIB
    ok = plan.fits(2.0)
    assert ok and ok.reason.startswith("fits: ")
    big = plan_memory(ARCH, Layout(), Workload(64, 1024), overhead_gib=0.0)
    verdict = big.fits(0.5)
    assert not verdict
    assert "> 0.5 GiB" in verdict.reason and "largest part is logits" in verdict.reason


# ------------------------------------------------------------------------------------------- FLOPs and peaks
def test_model_flops_per_token():
    # N_matmul = 4 * (64*128 + 64*64 + 3*64*96) + 300*64 = 142,080; 6N = 852,480; attention 12*4*128*64 = 393,216
    assert flops.matmul_params(ARCH) == 142_080
    assert flops.model_flops_per_token(ARCH, 128) == 852_480 + 393_216


def test_microbatch_flops_counts_rows_and_logit_positions():
    # per layer and token 2 * (64*128 + 64*64 + 3*64*96) = 61,440; attention 4 * S^2 * 64 per row and layer;
    # logits 2 * 64 * 300 = 38,400 per position
    layers = 4 * (2 * 10 * 61_440 + 2 * 4 * 10 * 10 * 64)
    assert flops.microbatch_flops(ARCH, 2, 10) == 3 * (layers + 2 * 10 * 38_400)
    assert flops.microbatch_flops(ARCH, 2, 10, logit_positions=3) == 3 * (layers + 2 * 3 * 38_400)
    # the per-token model FLOPs of one full row, less nothing: the same count
    assert flops.microbatch_flops(ARCH, 1, 128) == 128 * flops.model_flops_per_token(ARCH, 128)
    # attention over given (query, key) pairs instead of S x S per row: 4 * pairs * 64 per layer
    assert flops.microbatch_flops(ARCH, 2, 10, attention_pairs=2 * 10 * 10) == flops.microbatch_flops(ARCH, 2, 10)
    assert (flops.microbatch_flops(ARCH, 2, 10) - flops.microbatch_flops(ARCH, 2, 10, attention_pairs=55)
            == 3 * 4 * 4 * (200 - 55) * 64)


def test_microbatch_shape_with_shared_prompts():
    from megatron_pz.plan.archs import microbatch_shape, score_keys

    def cfg(objective="pretrainzero", mbs=4, masks=4, preds=8):
        train = SimpleNamespace(objective=objective, micro_batch_size=mbs, masks_per_paragraph=masks,
                                predictions_per_mask=preds, max_tokens_per_microbatch=None)
        return SimpleNamespace(train=train, corpus=SimpleNamespace(max_prompt_tokens=300), gen_max_new_tokens=40,
                               pred_max_new_tokens=20)

    assert microbatch_shape(cfg(), shared=False) == (4, 340)
    assert microbatch_shape(cfg(), shared=True) == (1, 300 + 4 * 40)  # mbs 4 <= both groups: 4 responses a row
    assert microbatch_shape(cfg(mbs=8, masks=2, preds=4), shared=True) == (4, 300 + 4 * 40)  # groups of 2 .. 4
    assert microbatch_shape(cfg(objective="rpt", mbs=8, preds=8), shared=True) == (1, 300 + 8 * 40)
    assert microbatch_shape(cfg(objective="sft_span"), shared=True) == (4, 340)  # no shared prompts
    packed = cfg()
    packed.train.max_tokens_per_microbatch = 1000
    assert microbatch_shape(packed, shared=True) == microbatch_shape(packed, shared=False) == (1, 1000)
    # the segment attention keeps 300^2 + 4 * 40 * (300 + 40) scores of the 460-token row: 314 keys a query
    assert score_keys(cfg(), shared=True, segments=True) == -(-(300 ** 2 + 4 * 40 * 340) // 460) == 314
    assert score_keys(cfg(), shared=True, segments=False) is None  # dense: S x S
    assert score_keys(cfg(), shared=False, segments=True) is None
    assert score_keys(packed, shared=True, segments=True) is None
    assert score_keys(cfg(objective="sft_span"), shared=True, segments=True) is None


def test_peak_tflops_table():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert flops.peak_tflops("NVIDIA GH200 480GB", "bf16") == 989.4
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None
    assert flops.peak_tflops("cpu", "bf16") is None


def test_real_model_counts_match_modelarch():
    from megatron_pz.plan.archs import preset

    for name in ("qwen3-4b", "qwen3-8b", "qwen3-30b-a3b"):
        arch = preset(name)
        dense, expert = params.stage_param_counts(arch, Layout(), 0)  # vocab 151936 needs no padding at TP1
        assert dense + expert == arch.num_parameters, name
