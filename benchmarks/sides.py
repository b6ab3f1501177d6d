"""The comparison's other sides, each run by ``bench compare`` in its own process (so peak RSS is per side).

    python -m megatron_pz.bench.sides trl      SPEC.json OUT.json   # TRL GRPOTrainer on the same workload
    python -m megatron_pz.bench.sides generate SPEC.json OUT.json   # plain transformers generate, same prompts

SPEC.json is written by ``bench.compare``: the ``Workload`` (prompt token ids and targets per step) and the
run's hyper-parameters. Both write per-step timings to OUT.json.

TRL side, what is set to match ``megatron-pz train`` (all names checked against trl 1.16's GRPOConfig):
  one optimizer step per training step over all ``prompts x num_generations`` samples
  (per_device_train_batch_size = micro_batch_size, gradient_accumulation_steps = samples / micro_batch_size,
  so TRL generates once per step for the whole batch, like our rollout), num_generations = predictions_per_mask,
  max_completion_length = pred_max_new_tokens, temperature, top_p, top_k=0, learning_rate, AdamW betas/eps,
  weight_decay, max_grad_norm = clip_grad, cosine schedule without warm-up, beta=0 (no KL, no reference model),
  epsilon = eps_low, epsilon_high = eps_high, loss_type="dapo" (token sum / tokens of the whole step, as ours),
  scale_rewards="group" (our std-normalised group advantages), num_iterations=1 (so TRL, like us, does not
  recompute old log-probs), no gradient checkpointing (ours has no recompute), use_cpu, fp32, TRL's own
  ``transformers`` generation (no vLLM), no dataset shuffling, no checkpoint saving.
  Prompts: our exact token ids (``_tokenize_prompts`` is overridden to return them); reward: our
  ``rewards.span.exact_match`` on the completion text against the same target.
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

    from megatron_pz.bench.measure import peak_rss_bytes

    data["peak_rss_self_bytes"] = peak_rss_bytes()
    data["torch_threads"] = torch.get_num_threads()
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


# ------------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict[str, Any], out_path: str) -> None:
    try:
        import trl
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:  # compare.py checks first; this is the fallback message
        raise SystemExit(f"bench: TRL is not installed ({exc}); pip install 'megatron_pz[bench]'") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from megatron_pz.bench.workload import Workload
    from megatron_pz.rewards.span import exact_match

    _threads(spec)
    torch.manual_seed(int(spec["seed"]))
    w = Workload.from_dict(spec["workload"])
    h = spec["hparams"]
    n = int(h["num_generations"])
    rows = [{"prompt": p.text, "target": p.target} for s in w.steps for p in s.prompts]
    ids_of = {p.text: p.ids for s in w.steps for p in s.prompts}
    per_step = len(w.steps[0].prompts) * n
    mbs = int(h["micro_batch_size"])
    if per_step % mbs:
        raise SystemExit(f"bench: samples per step ({per_step}) must be a multiple of the micro-batch ({mbs})")

    tok = AutoTokenizer.from_pretrained(w.tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(w.hf_dir, dtype=torch.float32)

    def reward_exact_match(prompts, completions, target, **kw):
        return [exact_match(c, t) for c, t in zip(completions, target)]

    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=int(spec["seed"]), max_steps=len(w.steps),
        per_device_train_batch_size=mbs, gradient_accumulation_steps=per_step // mbs, num_generations=n,
        max_completion_length=int(h["max_completion_length"]), temperature=float(h["temperature"]),
        top_p=float(h["top_p"]), top_k=0, learning_rate=float(h["lr"]), lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=float(h["weight_decay"]), adam_beta1=float(h["adam_beta1"]),
        adam_beta2=float(h["adam_beta2"]), adam_epsilon=float(h["adam_eps"]), max_grad_norm=float(h["clip_grad"]),
        beta=0.0, epsilon=float(h["eps_low"]), epsilon_high=float(h["eps_high"]), loss_type="dapo",
        scale_rewards="group", num_iterations=1, gradient_checkpointing=False, shuffle_dataset=False,
        dataloader_num_workers=0, use_vllm=False, log_completions=False,
    )

    phases: list[dict[str, float]] = []
    cur: dict[str, float] = {}

    class Timed(GRPOTrainer):
        def _tokenize_prompts(self, prompts):  # our exact token ids (the same prompts our trainer sends)
            return [list(ids_of[p]) for p in prompts], None, {}

        def _generate_single_turn(self, *a, **k):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **k)
            cur["generate_s"] = cur.get("generate_s", 0.0) + time.perf_counter() - t0
            cur["generated_tokens"] = cur.get("generated_tokens", 0) + sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            cur["rollout_s"] = cur.get("rollout_s", 0.0) + time.perf_counter() - t0
            cur["trained_tokens"] = cur.get("trained_tokens", 0) + int(out["prompt_mask"].sum()) + int(
                out["completion_mask"].sum())
            cur["loss_tokens"] = cur.get("loss_tokens", 0) + int(out["completion_mask"].sum())
            cur["samples"] = cur.get("samples", 0) + int(out["completion_mask"].shape[0])
            cur["padded_tokens"] = cur.get("padded_tokens", 0) + int(out["prompt_mask"].numel()) + int(
                out["completion_mask"].numel())
            return out

    class Clock(TrainerCallback):
        last = 0.0

        def on_train_begin(self, args, state, control, **kw):
            Clock.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            cur["step_s"] = now - Clock.last
            cur["train_s"] = cur["step_s"] - cur.get("rollout_s", 0.0)
            Clock.last = now
            phases.append(dict(cur))
            cur.clear()

    trainer = Timed(model=model, reward_funcs=[reward_exact_match], args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=tok, callbacks=[Clock()])
    trainer.train()
    rewards = [r.get("reward") for r in trainer.state.log_history if "reward" in r]
    _write(out_path, {"side": "trl", "trl_version": trl.__version__, "steps": phases, "rewards": rewards,
                      "params": sum(p.numel() for p in model.parameters())})


# ------------------------------------------------------------------------------------------- plain generate
def run_generate(spec: dict[str, Any], out_path: str) -> None:
    """``model.generate`` on each step's prompts, each repeated num_generations times, one left-padded batch
    (the layout our engine and TRL's generation get), sampling at the run's temperature / top-p."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_pz.bench.workload import Workload

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
