"""The comparison's other sides, each run by ``benchmarks.compare`` in its own process (so peak RSS is per side).

    python -m benchmarks.sides trl      SPEC.json OUT.json   # TRL GRPOTrainer on the same workload
    python -m benchmarks.sides generate SPEC.json OUT.json   # plain transformers generate, same prompts

SPEC.json is written by ``benchmarks.compare``: the ``Workload`` (prompt token ids and targets per step) and the
run's hyper-parameters (``trl_grpo.GRPOSettings``). Both write per-step timings to OUT.json. What the TRL side
sets to match ``megatron-pz train`` is listed in ``benchmarks.trl_grpo``.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any


def _threads(spec: dict[str, Any]) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))


def _write(path: str, data: dict[str, Any]) -> None:
    import torch

    from megatron_pz.scaling.measure import peak_rss_bytes

    data["peak_rss_self_bytes"] = peak_rss_bytes()
    data["torch_threads"] = torch.get_num_threads()
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


# ------------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict[str, Any], out_path: str) -> None:
    """TRL's GRPOTrainer (``trl_grpo.train_grpo``) on the workload's prompts (token ids), rewarded by our
    ``rewards.span.exact_match`` against the same targets."""
    from benchmarks.trl_grpo import GRPOPrompt, GRPOSettings, train_grpo
    from benchmarks.workload import Workload
    from megatron_pz.rewards.span import exact_match

    _threads(spec)
    w = Workload.from_dict(spec["workload"])
    prompts = [GRPOPrompt(p.text, p.target, p.ids) for s in w.steps for p in s.prompts]
    result = train_grpo(w.hf_dir, prompts, exact_match, GRPOSettings.from_dict(spec["hparams"]),
                        prompts_per_step=len(w.steps[0].prompts), steps=len(w.steps), out_dir=spec["out_dir"],
                        tokenizer_dir=w.tokenizer_dir, seed=int(spec["seed"]))
    _write(out_path, {"side": "trl", "trl_version": result.trl_version, "steps": result.steps,
                      "rewards": result.rewards, "params": result.params})


# ------------------------------------------------------------------------------------------- plain generate
def run_generate(spec: dict[str, Any], out_path: str) -> None:
    """``model.generate`` on each step's prompts, each repeated num_generations times, one left-padded batch
    (the layout our engine and TRL's generation get), sampling at the run's temperature / top-p."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.workload import Workload

    _threads(spec)
    torch.manual_seed(int(spec["seed"]))
    w = Workload.from_dict(spec["workload"])
    h = spec["hparams"]
    n = int(h["num_generations"])
    model = AutoModelForCausalLM.from_pretrained(w.hf_dir, dtype=torch.float32).eval()
    eos = w.eos_token_id
    pad = eos if eos is not None else 0
    rows = []
    for s in w.steps:
        seqs = [p.ids for p in s.prompts for _ in range(n)]
        width = max(len(x) for x in seqs)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in seqs])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=float(h["temperature"]), top_p=float(h["top_p"]), top_k=0,
                                 max_new_tokens=int(h["max_completion_length"]), pad_token_id=pad,
                                 eos_token_id=eos)
        dt = time.perf_counter() - t0
        gen = out[:, width:]
        tokens = 0
        for row in gen.tolist():  # count up to and including the first EOS, as our engine reports
            tokens += (row.index(eos) + 1) if eos is not None and eos in row else len(row)
        rows.append({"generate_s": dt, "generated_tokens": tokens, "batch": len(seqs)})
    _write(out_path, {"side": "generate", "steps": rows, "params": sum(p.numel() for p in model.parameters())})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("trl", "generate"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        spec = json.load(f)
    (run_trl if argv[0] == "trl" else run_generate)(spec, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
