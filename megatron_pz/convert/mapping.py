"""HF <-> Megatron-Core parameter names and layouts for Llama / Qwen2 / Qwen3 / SmolLM3 / Qwen3-MoE (pure functions).

Three layouts appear here:

* HF: ``model.layers.{i}.self_attn.q_proj.weight`` etc.
* Megatron *full* (the TP=1 layout, global layer index ``i``), named canonically with Transformer Engine's
  names, which are also the keys of ``torch_dist`` checkpoints for both the TE and the local layer spec.
* Megatron *local shard*: what one TP rank holds (``shard_tp`` / ``unshard_tp`` convert full <-> shard).

Fused layouts (shapes for hidden h, head_dim d, heads H, KV groups G, heads per group P = H/G, ffn f):

* ``linear_qkv.weight`` [G*(P+2)*d, h]: group-major, per group [q of its P heads; k; v]. With TP, each rank
  holds G/TP whole groups, i.e. a contiguous block of rows.
* ``linear_fc1.weight`` [2f, h] = [gate; up]. With TP, each rank holds [gate_r; up_r] (not a row block).
* Embedding / output layer rows are padded from ``vocab_size`` to ``padded_vocab_size(tp)`` with zeros;
  padded rows never reach an HF export.

MoE layers (Qwen3-MoE) name experts by their *global* index ``e``:
``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight`` [2f_moe, h] = [gate; up] of HF's
``mlp.experts.{e}.{gate,up}_proj``, ``...linear_fc2.weight`` = ``down_proj``; ``mlp.router.weight`` [E, h] =
``mlp.gate.weight``. With expert parallelism EP, rank r holds experts r*E/EP ... (r+1)*E/EP-1 as its local
experts 0 ... E/EP-1 (the bridge adds that offset). Expert tensors are split over the *expert* tensor-parallel
group with the same fc1/row rules. The MoE layer's pre-MLP norm keeps its own name ``pre_mlp_layernorm.weight``
(TE's MoE spec has no fused linear to put it in), which is also its torch_dist key.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from megatron_pz.errors import CheckpointError
from megatron_pz.model.arch import ModelArch

# Local-spec parameter names -> canonical (TE) names; TE's fused layernorm lives inside the linear layer.
_LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

# Tensor-parallel partitioning of each canonical parameter suffix: "col" splits dim 0, "row" splits dim 1,
# "fc1" splits gate and up separately, None = replicated.
_TP_SPLIT = {
    "embedding.word_embeddings.weight": "col",
    "output_layer.weight": "col",
    "self_attention.linear_qkv.weight": "col",
    "self_attention.linear_qkv.bias": "col",
    "self_attention.linear_proj.weight": "row",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "row",
    "self_attention.linear_qkv.layer_norm_weight": None,
    "mlp.linear_fc1.layer_norm_weight": None,
    "self_attention.q_layernorm.weight": None,
    "self_attention.k_layernorm.weight": None,
    "decoder.final_layernorm.weight": None,
    # MoE layers (experts split over the expert-TP group).
    "pre_mlp_layernorm.weight": None,
    "mlp.router.weight": None,
    "mlp.experts.local_experts.*.linear_fc1.weight": "fc1",
    "mlp.experts.local_experts.*.linear_fc2.weight": "row",
}

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# An expert's weight: SequentialMLP (local spec) "local_experts.{l}.linear_fc1.weight" or TEGroupedMLP
# "linear_fc1.weight{l}"; the canonical form is the former with the global expert index.
_SEQUENTIAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED_EXPERT_RE = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_EXPERT_RE = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


def canonical_name(local_name: str, layer_offset: int = 0, expert_offset: int = 0, moe: bool = False) -> str:
    """Model parameter name on a PP (and EP) stage -> canonical full name with global layer / expert index.

    ``moe``: the model is a mixture of experts (its pre-MLP norm keeps its own name, see the module doc).
    """
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    i, suffix = int(m.group(1)) + layer_offset, m.group(2)
    e = _SEQUENTIAL_EXPERT_RE.match(suffix)
    g = _GROUPED_EXPERT_RE.match(suffix)
    if e or g:
        local, fc = (int(e.group(1)), e.group(2)) if e else (int(g.group(2)), g.group(1))
        return f"decoder.layers.{i}.mlp.experts.local_experts.{local + expert_offset}.{fc}.weight"
    if not (moe and suffix == "pre_mlp_layernorm.weight"):
        suffix = _LOCAL_TO_CANONICAL.get(suffix, suffix)
    return f"decoder.layers.{i}.{suffix}"


def is_expert(canonical: str) -> bool:
    """True for an expert's weight (split over the expert-TP group, distributed over the EP group)."""
    return _EXPERT_RE.match(canonical) is not None


def expert_index(canonical: str) -> int:
    """The global expert index of an expert weight's canonical name."""
    m = _EXPERT_RE.match(canonical)
    if not m:
        raise CheckpointError(f"{canonical!r} is not an expert weight")
    return int(m.group(2))


def with_expert_index(canonical: str, expert: int) -> str:
    """The same expert weight name for another (global) expert index."""
    m = _EXPERT_RE.match(canonical)
    if not m:
        raise CheckpointError(f"{canonical!r} is not an expert weight")
    return f"decoder.layers.{m.group(1)}.mlp.experts.local_experts.{expert}.{m.group(3)}.weight"


def tp_split_kind(canonical: str) -> str | None:
    """How TP splits a canonical parameter: "col" (dim 0), "row" (dim 1), "fc1" (gate and up apart), None."""
    m = _LAYER_RE.match(canonical)
    key = m.group(2) if m else canonical
    key = re.sub(r"local_experts\.\d+\.", "local_experts.*.", key)
    if key not in _TP_SPLIT:
        raise CheckpointError(f"no tensor-parallel layout known for parameter {canonical!r}")
    return _TP_SPLIT[key]


def megatron_names(arch: ModelArch) -> list[str]:
    """Canonical full names of every Megatron parameter of this architecture (output layer if untied)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "self_attention.linear_qkv.layer_norm_weight", p + "self_attention.linear_qkv.weight"]
        if arch.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if arch.qk_norm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names.append(p + "self_attention.linear_proj.weight")
        if arch.is_moe:
            names += [p + "pre_mlp_layernorm.weight", p + "mlp.router.weight"]
            for e in range(arch.num_experts):
                names += [p + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                          p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
        else:
            names += [p + "mlp.linear_fc1.layer_norm_weight", p + "mlp.linear_fc1.weight",
                      p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_sources(canonical: str, arch: ModelArch) -> list[str]:
    """HF tensor names a Megatron parameter is built from (in concatenation order)."""
    if canonical == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if canonical == "output_layer.weight":
        return ["model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"]
    if canonical == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    m = _LAYER_RE.match(canonical)
    if not m:
        raise CheckpointError(f"unknown Megatron parameter {canonical!r}")
    p, suffix = f"model.layers.{m.group(1)}.", m.group(2)
    x = _EXPERT_RE.match(canonical)
    if x:
        e, fc = x.group(2), x.group(3)
        if fc == "linear_fc1":
            return [p + f"mlp.experts.{e}.gate_proj.weight", p + f"mlp.experts.{e}.up_proj.weight"]
        return [p + f"mlp.experts.{e}.down_proj.weight"]
    table = {
        "self_attention.linear_qkv.layer_norm_weight": ["input_layernorm.weight"],
        "self_attention.linear_qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                             "self_attn.v_proj.weight"],
        "self_attention.linear_qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                           "self_attn.v_proj.bias"],
        "self_attention.q_layernorm.weight": ["self_attn.q_norm.weight"],
        "self_attention.k_layernorm.weight": ["self_attn.k_norm.weight"],
        "self_attention.linear_proj.weight": ["self_attn.o_proj.weight"],
        "mlp.linear_fc1.layer_norm_weight": ["post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        "mlp.linear_fc2.weight": ["mlp.down_proj.weight"],
        "pre_mlp_layernorm.weight": ["post_attention_layernorm.weight"],
        "mlp.router.weight": ["mlp.gate.weight"],
    }
    if suffix not in table:
        raise CheckpointError(f"unknown Megatron parameter {canonical!r}")
    return [p + s for s in table[suffix]]


def hf_names(arch: ModelArch) -> list[str]:
    """Every tensor name an HF checkpoint of this architecture has."""
    names: list[str] = []
    for n in megatron_names(arch):
        if n == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        names += [s for s in hf_sources(n, arch) if s not in names]
    return names


def _expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"shape mismatch for {name}: checkpoint has {tuple(t.shape)}, "
                              f"the architecture expects {tuple(shape)}")


def to_megatron(canonical: str, get_hf: Callable[[str], torch.Tensor], arch: ModelArch,
                padded_vocab: int) -> torch.Tensor:
    """Build the full (TP=1) Megatron tensor ``canonical`` from HF tensors fetched with ``get_hf``."""
    h, d, H, G = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    srcs = hf_sources(canonical, arch)
    ts = [get_hf(s) for s in srcs]
    if canonical in ("embedding.word_embeddings.weight", "output_layer.weight"):
        _expect_shape(srcs[0], ts[0], (arch.vocab_size, h))
        pad = ts[0].new_zeros(padded_vocab - arch.vocab_size, h)
        return torch.cat([ts[0], pad], 0)
    if canonical.endswith("linear_qkv.weight") or canonical.endswith("linear_qkv.bias"):
        q, k, v = ts
        tail = (h,) if canonical.endswith("weight") else ()
        _expect_shape(srcs[0], q, (H * d, *tail))
        _expect_shape(srcs[1], k, (G * d, *tail))
        _expect_shape(srcs[2], v, (G * d, *tail))
        P = H // G
        qkv = torch.cat([q.reshape(G, P * d, *tail), k.reshape(G, d, *tail), v.reshape(G, d, *tail)], 1)
        return qkv.reshape(G * (P + 2) * d, *tail)
    ffn = arch.moe_ffn_hidden_size if is_expert(canonical) else arch.ffn_hidden_size
    if canonical.endswith("linear_fc1.weight"):
        _expect_shape(srcs[0], ts[0], (ffn, h))
        _expect_shape(srcs[1], ts[1], (ffn, h))
        return torch.cat(ts, 0)
    if canonical.endswith("linear_proj.weight"):
        _expect_shape(srcs[0], ts[0], (h, H * d))
    elif canonical.endswith("linear_fc2.weight"):
        _expect_shape(srcs[0], ts[0], (h, ffn))
    elif canonical.endswith("mlp.router.weight"):
        _expect_shape(srcs[0], ts[0], (arch.num_experts, h))
    elif canonical.endswith("q_layernorm.weight") or canonical.endswith("k_layernorm.weight"):
        _expect_shape(srcs[0], ts[0], (d,))
    else:  # the RMSNorm weights over hidden
        _expect_shape(srcs[0], ts[0], (h,))
    return ts[0]


def to_hf(canonical: str, full: torch.Tensor, arch: ModelArch) -> dict[str, torch.Tensor]:
    """Inverse of ``to_megatron``: HF tensors from a full Megatron tensor (drops vocab padding)."""
    d, H, G = arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    srcs = hf_sources(canonical, arch)
    if canonical in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {srcs[0]: full[: arch.vocab_size]}
    if canonical.endswith("linear_qkv.weight") or canonical.endswith("linear_qkv.bias"):
        P = H // G
        tail = tuple(full.shape[1:])
        g = full.reshape(G, (P + 2) * d, *tail)
        q, k, v = torch.split(g, [P * d, d, d], dim=1)
        return {srcs[0]: q.reshape(H * d, *tail), srcs[1]: k.reshape(G * d, *tail),
                srcs[2]: v.reshape(G * d, *tail)}
    if canonical.endswith("linear_fc1.weight"):
        gate, up = torch.chunk(full, 2, dim=0)
        return {srcs[0]: gate, srcs[1]: up}
    return {srcs[0]: full}


def shard_tp(canonical: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of a full Megatron tensor that TP rank ``tp_rank`` of ``tp_size`` holds."""
    kind = tp_split_kind(canonical)
    if kind is None or tp_size == 1:
        return full
    if kind == "col":
        return torch.chunk(full, tp_size, dim=0)[tp_rank]
    if kind == "row":
        return torch.chunk(full, tp_size, dim=1)[tp_rank]
    gate, up = torch.chunk(full, 2, dim=0)  # fc1: each rank holds [gate_r; up_r]
    return torch.cat([torch.chunk(gate, tp_size, 0)[tp_rank], torch.chunk(up, tp_size, 0)[tp_rank]], 0)


def unshard_tp(canonical: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard_tp``: the full tensor from all TP ranks' shards (in rank order)."""
    kind = tp_split_kind(canonical)
    if kind is None or len(shards) == 1:
        return shards[0]
    if kind == "col":
        return torch.cat(shards, 0)
    if kind == "row":
        return torch.cat(shards, 1)
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([torch.cat([g for g, _ in halves], 0), torch.cat([u for _, u in halves], 0)], 0)
