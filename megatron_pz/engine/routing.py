"""Recording which experts an MoE model routed each token to, for the trainer to replay (routing replay, R3).

SGLang returns the same record (``--enable-return-routed-experts`` and a request's ``return_routed_experts``):
``meta_info.routed_experts``, int32, one row per token fed through the model (every prompt token and every
response token but the last, which is never fed), each row the top-k expert ids of every layer, layer-major:
shape ``(P + R - 1, L * K)`` (``sglang/srt/state_capturer/routed_experts.py``, ``batch_result_processor.py``).

Here forward hooks on each layer's router (HF Qwen3-MoE: ``layer.mlp.gate`` returns ``(logits, weights,
top-k ids)``) record the ids of every forward call of one ``generate``: the prefill (or the shared prefill of
``generation.shared_prompt_cache`` and the last prompt column) and one call per decoded token. ``assemble`` cuts
each row's tokens out of them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks of an HF causal LM in layer order ([] for a dense model): an ``mlp`` with a
    ``gate`` router and ``experts``."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return [layer.mlp for layer in layers if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


class RoutingRecorder:
    """Context manager: while open, every forward call of ``model`` appends one ``(B, S, L, K)`` int tensor of
    top-k expert ids to ``calls`` (B, S: the call's input shape; L: MoE layers; K: top-k)."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = moe_blocks(model)
        self.calls: list[torch.Tensor] = []
        self._layers: list[torch.Tensor] = []
        self._shape: tuple[int, int] | None = None
        self._handles: list = []

    def __enter__(self) -> "RoutingRecorder":
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._block_input(i)))
            self._handles.append(block.gate.register_forward_hook(self._gate_output))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _block_input(self, layer: int):
        def hook(module, args):
            if layer == 0:
                self._layers = []
            self._shape = tuple(args[0].shape[:2])  # (B, S) of hidden states [B, S, H]
        return hook

    def _gate_output(self, module, args, output) -> None:
        ids = output[-1]  # (B*S, K) top-k expert ids (Qwen3MoeTopKRouter: logits, weights, indices)
        b, s = self._shape
        self._layers.append(ids.detach().to("cpu", torch.int32).reshape(b, s, -1))
        if len(self._layers) == len(self.blocks):
            self.calls.append(torch.stack(self._layers, dim=2))  # (B, S, L, K)


def assemble(calls: Sequence[torch.Tensor], prompt_lens: Sequence[int], keep: Sequence[int],
             shared_index: Sequence[int] | None) -> list[np.ndarray]:
    """Per row, the routing of its ``prompt_len + keep - 1`` fed tokens, ``(tokens, L * K)`` int32 (SGLang's
    layout).

    ``calls``: the recorder's calls of one left-padded batch of ``len(prompt_lens)`` rows and padded prompt length
    Lp: either ``[(B, Lp), (B, 1) x decode steps]`` or, when ``shared_index`` maps each row to its distinct
    prompt, ``[(U, Lp - 1), (B, 1) last prompt column, (B, 1) x decode steps]``. ``keep``: response tokens kept.
    """
    if shared_index is None:
        prefill, rest = calls[0], list(calls[1:])
        prompt_part = [prefill[r, prefill.shape[1] - p:] for r, p in enumerate(prompt_lens)]
    else:
        head, last, rest = calls[0], calls[1], list(calls[2:])
        lp = head.shape[1] + 1
        prompt_part = [torch.cat([head[u, lp - p:], last[r]]) for r, (u, p) in
                       enumerate(zip(shared_index, prompt_lens))]
    decode = torch.cat(rest, dim=1) if rest else None  # (B, T - 1, L, K)
    out = []
    for r, part in enumerate(prompt_part):
        n = max(keep[r] - 1, 0)
        rows = part if n == 0 else torch.cat([part, decode[r, :n]])
        out.append(rows.reshape(rows.shape[0], -1).numpy())
    return out
