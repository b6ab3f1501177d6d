"""Check mode: does the engine now serve the trainer's weights? (``--check-weight-update-equal`` in slime.)

``check_weights`` compares leading rows of each tensor through ``/get_weights_by_name``; ``check_logprobs``
compares the engine's logprobs on a fixed prompt with the trainer's own forward pass.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_pz.rollout.protocol import RolloutEngine, SamplingParams


@dataclass
class CheckReport:
    ok: bool
    max_abs_diff: float
    mean_abs_diff: float
    num_values: int
    worst: str = ""
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"{'OK' if self.ok else 'MISMATCH'}: max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} "
                f"over {self.num_values} values (worst: {self.worst})")


def check_weights(engine: Any, expected: Mapping[str, torch.Tensor], truncate_size: int = 4, atol: float = 1e-6,
                  rtol: float = 1e-2) -> CheckReport:
    """Compare the first ``truncate_size`` rows of each tensor via ``get_weights_by_name``.

    ``engine`` is an ``SGLangClient``/``EmbeddedEngine`` (SGLang returns TP rank 0's rows; with TP the first rows
    are on rank 0, so ``truncate_size`` should stay below the per-rank row count). Tolerance is per value:
    ``atol + rtol * |expected|`` (bf16 engines round to 8 bits of mantissa).
    """
    total = 0.0
    worst_val, worst_name, count, ok = 0.0, "", 0, True
    for name, want in expected.items():
        got = torch.tensor(engine.get_weights_by_name(name, truncate_size), dtype=torch.float32)
        ref = want.detach().float().cpu()[:truncate_size]
        if got.shape != ref.shape:
            return CheckReport(False, float("inf"), float("inf"), count, f"{name}: shape {tuple(got.shape)} vs "
                                                                          f"{tuple(ref.shape)}")
        diff = (got - ref).abs()
        ok &= bool((diff <= atol + rtol * ref.abs()).all())
        total += float(diff.sum())
        count += diff.numel()
        if diff.numel() and float(diff.max()) >= worst_val:
            worst_val, worst_name = float(diff.max()), name
    return CheckReport(ok, worst_val, total / max(count, 1), count, worst_name)


def check_logprobs(engine: RolloutEngine, prompt_ids: Sequence[int],
                   reference_logprobs: Callable[[Sequence[int], Sequence[int], float], Sequence[float]],
                   max_new_tokens: int = 32, temperature: float = 0.0, atol: float = 1e-3) -> CheckReport:
    """Generate on a fixed prompt and compare the engine's logprobs with the trainer's recomputation.

    ``reference_logprobs(prompt_ids, response_ids, temperature)`` must return log softmax(logits / T) at the
    response tokens (log softmax(logits) for T = 0), one per response token: the trainer's forward pass.
    """
    res = engine.generate([list(prompt_ids)], SamplingParams(n=1, max_new_tokens=max_new_tokens,
                                                             temperature=temperature))[0][0]
    ref = torch.tensor(list(reference_logprobs(prompt_ids, res.response_ids, temperature)), dtype=torch.float64)
    got = torch.tensor(res.logprobs, dtype=torch.float64)
    if ref.shape != got.shape:
        return CheckReport(False, float("inf"), float("inf"), 0, f"{len(ref)} reference logprobs for "
                                                                 f"{len(got)} response tokens")
    diff = (got - ref).abs()
    worst = int(diff.argmax()) if diff.numel() else -1
    return CheckReport(bool((diff <= atol).all()), float(diff.max()) if diff.numel() else 0.0,
                       float(diff.mean()) if diff.numel() else 0.0, diff.numel(), f"token {worst}",
                       {"weight_version": res.weight_version, "response_ids": res.response_ids})
