"""Model architectures for plans and scaling sweeps, without weights: presets, HF folders, checkpoints, run configs.

Presets are the published HF ``config.json`` values of models we plan for (written from the model cards'
configs, not fetched: this project builds offline). Their parameter counts reproduce the cards: Qwen3-0.6B
0.60B, 1.7B 1.72B, 4B 4.02B, 8B 8.19B, 30B-A3B 30.5B with 3.35B active.
``tiny`` is the CPU sweep's model: a 4-layer random Llama with SmolLM2's vocabulary (as the e2e tests' tiny
policy), so its logits cost what they cost with the real tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_pz.data.objectives import objective_of
from megatron_pz.errors import ConfigError
from megatron_pz.model.arch import ModelArch

_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=40960, hidden_act="silu")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU sweeps: small enough for 2 cores, big enough that every parallel dimension does real work.
    "tiny": dict(model_type="llama", vocab_size=49152, hidden_size=256, intermediate_size=768,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                 tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu"),
    # SmolLM2-135M(-Instruct): what `policy.load: smollm2` converts (used when its cache does not exist yet).
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_theta=100000.0, hidden_act="silu"),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(_QWEN3, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          tie_word_embeddings=False, num_experts=128, moe_intermediate_size=768,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}


def preset(name: str) -> ModelArch:
    try:
        return ModelArch.from_hf_config(dict(PRESETS[name]))
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}") from None


def resolve_arch(spec: str, vocab_size: int | None = None, allow_pickle: bool = False) -> ModelArch:
    """A preset name, "smollm2" (its cached config, else the preset), an HF folder or config.json, or a
    Megatron checkpoint root (architecture from its metadata; no weights are read)."""
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.convert.source import SMOLLM2

    if spec in PRESETS:
        return preset(spec)
    if spec == SMOLLM2:  # a dry run reads the cached conversion's config but never converts
        from megatron_pz.convert.smollm2 import cache_root

        cached = cache_root() / "smollm2-135m-instruct" / "hf" / "config.json"
        return ModelArch.from_hf_config(cached) if cached.exists() else preset("smollm2-135m")
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        return ModelArch.from_hf_config(json.loads(path.read_text()))
    if ckpt.is_megatron_checkpoint(path):
        return ckpt.read_arch(path, vocab_size=vocab_size, allow_pickle=allow_pickle)
    if (path / "config.json").exists():
        return ModelArch.from_hf_config(path)
    raise ConfigError(f"model {spec!r} is not a preset ({', '.join(sorted(PRESETS))}), 'smollm2', an HF folder "
                      f"or config.json, or a Megatron checkpoint (latest_checkpointed_iteration.txt)"
                      + ("; the path does not exist (a placeholder? pass --model PRESET)" if not path.exists() else ""))


def seq_length_of(cfg: Any) -> int:
    """Longest sequence a run trains on: the prompt cap plus the longest response cap."""
    return cfg.corpus.max_prompt_tokens + max(cfg.gen_max_new_tokens, cfg.pred_max_new_tokens)


def microbatch_shape(cfg: Any, shared: bool) -> tuple[int, int]:
    """(rows, sequence length) of the largest micro-batch a run trains on, as ``trainer/batching.py`` lays it out.

    Unshared: ``micro_batch_size`` rows of prompt + longest response. ``shared`` (``train.shared_prompt``): a row
    holds a group's prompt once and up to k = min(micro_batch_size, largest group) responses, and a micro-batch
    has up to ceil(micro_batch_size / min(micro_batch_size, smallest group)) rows: fewer tokens when prompts
    dominate, but a longer row (the local spec's S x S attention grows with it). Groups: the generator's
    ``masks_per_paragraph`` and the predictor's ``predictions_per_mask`` (pretrainzero), ``predictions_per_mask``
    (random_span, rpt); sft_span samples share no prompt. ``train.max_tokens_per_microbatch``: one packed row of
    that many tokens (rounded up to 8).
    """
    t = cfg.train
    if getattr(t, "max_tokens_per_microbatch", None):
        return 1, -(-t.max_tokens_per_microbatch // 8) * 8
    row = _shared_row(cfg) if shared else None
    if row is None:
        return t.micro_batch_size, seq_length_of(cfg)
    rows, prompt, k, response = row
    return rows, prompt + k * response


def score_keys(cfg: Any, shared: bool, segments: bool) -> int | None:
    """Keys per query whose attention scores the largest micro-batch's rows keep, on average (None = the row's
    length, S x S per row). With the segment attention (``train.shared_prompt_attention`` segments) a shared row of
    a P-token prompt and k responses of R keeps P^2 + k R (P + R) scores (``model/segment_attention.py``) instead of
    (P + k R)^2. Packed rows are planned at S x S."""
    packed = getattr(cfg.train, "max_tokens_per_microbatch", None)
    row = _shared_row(cfg) if shared and segments and not packed else None
    if row is None:
        return None
    _, p, k, r = row
    return -(-(p * p + k * r * (p + r)) // (p + k * r))


def _shared_row(cfg: Any) -> tuple[int, int, int, int] | None:
    """(rows, prompt, responses per row, response length) of the largest shared-prompt micro-batch; None when the
    objective's samples share no prompt."""
    t = cfg.train
    mbs = t.micro_batch_size
    objective = objective_of(t)
    if not objective.shared_prompts:
        return None
    groups = [getattr(t, name) for name in objective.group_sizes]
    k_max, k_min = min(mbs, max(groups)), min(mbs, min(groups))
    response = max(cfg.gen_max_new_tokens, cfg.pred_max_new_tokens)
    return -(-mbs // k_min), cfg.corpus.max_prompt_tokens, k_max, response


def samples_per_dp_rank(cfg: Any, dp: int) -> int:
    """Upper bound of the sequences one DP rank trains on per step (before the DAPO filter drops groups).

    PretrainZero: per paragraph, M generator samples + M x K predictor samples; random-span and rpt: M x K.
    """
    t = cfg.train
    per_paragraph = t.masks_per_paragraph * t.predictions_per_mask
    if objective_of(t).generator:
        per_paragraph += t.masks_per_paragraph
    return t.paragraphs_per_step // dp * per_paragraph
