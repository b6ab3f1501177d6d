"""``python -m benchmarks.compare``: the same PretrainZero workload through this project and through TRL, side by side.

    python -m benchmarks.compare                     # = --config examples/bench_cpu.yaml --out runs/bench/compare
    python -m benchmarks.compare --config examples/bench_cpu.yaml --out runs/bench/compare [key=value ...]

Sides, each in its own process (peak memory is per side: the sum of the kernel's high-water marks of the process
and all its children, ``benchmarks.peaks``):
  ours      ``megatron-pz train`` with ``train.objective=random_span`` and ``advantage.dapo_filter=false``
            (every sample is trained, as TRL trains every sample): Megatron trainer + embedded rollout server
  trl       TRL ``GRPOTrainer`` on the same HF weights, prompts (token ids), targets, group layout and
            hyper-parameters (``benchmarks.trl_grpo`` lists what is matched), CPU, fp32, TRL's own generation
  generate  plain ``transformers`` ``generate`` on the same prompts x generations, lengths and batch
  pretrainzero  (unless --no-pretrainzero) our full PretrainZero step (generator + predictor), reported apart
Prompts come from ``benchmarks.workload`` (the trainer's own corpus reader and seeds); the bench checks that the
paragraphs our trainer logged in data_order.jsonl are the ones the other sides got.

Figures per side, over the steps after ``--warmup``: step time (ours without checkpoint saving: TRL saves
nothing), rollout tokens/s = generated tokens / rollout phase time, train tokens/s = prompt + response tokens of
the trained samples (no padding) / train phase time, peak RSS; ratios ours/TRL. Ours also: achieved train FLOP/s
= the matmul FLOPs the trainer executed / train time (``train/flops``: the micro-batches as laid out, padding
included, attention over the pairs the masks allow, a shared prompt once per micro-batch, ``plan.flops.microbatch_flops``; metrics without it fall
back to the dense 6NT rule on prompt + response tokens) over this process's measured fp32 matmul FLOP/s
(``megatron_pz.scaling.measure.matmul_gflops``);
rollout tokens/s over plain generate; weight-sync seconds; the share of the step in rollout / train / sync / save /
idle (idle = step - the phases). Writes <out>/bench.json and <out>/bench.md, and prints the table. ``uptime`` load
averages are recorded before and after each side: the figures are only comparable at similar load. So is the
bench's own CPU time while each side runs (``monitor_cpu_s``), the cost of measuring.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.procs import require_trl, run_side
from benchmarks.report import markdown_table, mean, ours_steps, summarize, text_table
from megatron_pz.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "examples/bench_cpu.yaml"
OURS_OVERRIDES = ["train.objective=random_span", "advantage.dapo_filter=false", "logging.progress_bar=false",
                  "logging.tensorboard=false", "checkpoint.save_interval=0"]


# ------------------------------------------------------------------------------------------- the command
def _env() -> dict[str, str]:
    """The sides' environment: the repository root on PYTHONPATH, so ``python -m benchmarks.sides`` imports from
    any working directory."""
    e = dict(os.environ)
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    return e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_ours(config: str, overrides: list[str], out: Path, name: str, extra: list[str]) -> tuple[list, dict, Path]:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume an earlier bench run
    cmd = [sys.executable, "-m", "megatron_pz.cli", "train", "--config", config, *overrides, *extra,
           f"output_dir={run_dir}"]
    info = run_side(name, cmd, out / f"{name}.log", _env())
    return ours_steps(_read_jsonl(run_dir / "metrics.jsonl")), info, run_dir


def compare(config: str, overrides: list[str], out: Path, steps: int | None, warmup: int, threads: int | None,
            pretrainzero: bool, sides: tuple[str, ...] = ("ours", "trl", "generate")) -> dict[str, Any]:
    import platform

    import torch

    from benchmarks.trl_grpo import GRPOSettings
    from benchmarks.workload import build_workload
    from megatron_pz.config import load_config
    from megatron_pz.scaling.measure import matmul_gflops

    trl_version = require_trl() if "trl" in sides else None
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    cfg = load_config(config, overrides)
    steps = cfg.train.steps
    if steps <= warmup:
        raise UserError(f"bench: --steps ({steps}) must exceed --warmup ({warmup})")
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    t_start = time.time()
    # the random-span view of this run file: the workload every side runs
    rs_cfg = load_config(config, [*overrides, "train.objective=random_span"])
    work = build_workload(rs_cfg, steps)
    spec = {"workload": work.to_dict(), "hparams": asdict(GRPOSettings.from_config(rs_cfg)), "seed": rs_cfg.train.seed,
            "threads": threads, "out_dir": str(out / "trl_out")}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))

    gflops = matmul_gflops(seconds=2.0)
    measured: dict[str, Any] = {}
    info: dict[str, Any] = {}
    ours_rows, _, run_dir = run_ours(config, overrides, out, "ours", OURS_OVERRIDES)
    info["ours"] = _
    logged = [r["paragraph_ids"] for r in _read_jsonl(run_dir / "data_order.jsonl")]
    expected = [sorted(s.paragraph_ids) for s in work.steps]
    same_data = logged == expected
    if not same_data:
        raise UserError(f"bench: our trainer read other paragraphs than the bench's workload ({logged} vs "
                        f"{expected}); the sides would not be comparable")
    for side in ("trl", "generate"):
        if side in sides:
            path = out / f"{side}.json"
            info[side] = run_side(side, [sys.executable, "-m", "benchmarks.sides", side, str(spec_path),
                                         str(path)], out / f"{side}.log", _env())
            measured[side] = json.loads(path.read_text())
    params = (measured.get("generate") or measured.get("trl") or {}).get("params")
    if params is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(work.hf_dir)).parameters())
    summary = summarize(ours_rows, measured.get("trl", {}).get("steps"), measured.get("generate", {}).get("steps"),
                        warmup=warmup, params=params, matmul_gflops=gflops,
                        peak_rss={k: v["peak_rss_bytes"] for k, v in info.items()})
    if pretrainzero:
        pz_rows, info["pretrainzero"], _ = run_ours(config, overrides, out, "pretrainzero",
                                                    [o for o in OURS_OVERRIDES if "objective" not in o
                                                     and "dapo" not in o] + ["train.objective=pretrainzero"])
        pz = summarize(pz_rows, None, None, warmup=warmup, params=params, matmul_gflops=gflops,
                       peak_rss={"ours": info["pretrainzero"]["peak_rss_bytes"]})["ours"]
        # with the DAPO filter on, throughput/tokens_per_s counts filtered samples too: no train-token figures;
        # the executed FLOPs count only the micro-batches the trainer ran, so they stay
        dropped = ["train_tokens_per_s", "trained_tokens"]
        if pz.get("train_flops_source") != "executed":
            dropped += ["train_flops_per_s", "train_flops_over_matmul", "train_flops_source"]
        for k in dropped:
            pz.pop(k, None)
        pz["loss_tokens"] = mean([r["loss_tokens"] for r in pz_rows[warmup:]])
        summary["pretrainzero"] = pz
    summary.update({
        "command": " ".join(["python", "-m", "benchmarks.compare", "--config", config, "--out", str(out),
                             *(["--threads", str(threads)] if threads else []), *overrides]),
        "commit": _git_commit(),
        "machine": {"platform": platform.platform(), "processor": _cpu_model() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "trl": trl_version},
        "sides": info, "same_paragraphs": same_data,
        "per_step": {"ours": ours_rows, **{k: v["steps"] for k, v in measured.items()}},
        "wall_s": time.time() - t_start,
        "workload": {"steps": steps, "prompts_per_step": len(work.steps[0].prompts),
                     "generations_per_prompt": rs_cfg.train.predictions_per_mask,
                     "max_new_tokens": rs_cfg.pred_max_new_tokens,
                     "prompt_tokens_mean": mean([len(p.ids) for s in work.steps for p in s.prompts])},
    })
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "bench.md").write_text(markdown_table(summary) + "\n" + _load_note(summary) + "\n\n" +
                                  _measuring_note(summary).replace("\n", "\n\n") + "\n")
    return summary


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _load_note(s: dict[str, Any]) -> str:
    parts = [f"{k}: load {v['load_before']} -> {v['load_after']}, {v['wall_s']:.0f} s wall, "
             f"{v.get('cpu_s', float('nan')):.0f} CPU-s (whole run)"
             for k, v in s["sides"].items()]
    return "Load averages (1/5/15 min) before -> after each side: " + "; ".join(parts)


def _measuring_note(s: dict[str, Any]) -> str:
    """How memory was measured, and what measuring cost: the bench's own CPU seconds while each side ran."""
    sides = s["sides"].values()
    method = next((v["memory_method"] for v in sides if "memory_method" in v), None)
    cost = "; ".join(f"{k} {v['monitor_cpu_s']:.2f} CPU-s over {v['wall_s']:.0f} s "
                     f"({100 * v['monitor_cpu_share']:.2f}% of one core)"
                     for k, v in s["sides"].items() if "monitor_cpu_s" in v)
    return f"Memory: {method}.\nThe bench's own CPU while each side ran: {cost}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"run file (default {DEFAULT_CONFIG})")
    p.add_argument("--out", default="runs/bench/compare", help="output folder (bench.json, bench.md, logs)")
    p.add_argument("--steps", type=int, default=None, help="steps per side, warm-up included (default: train.steps)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the figures")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--no-pretrainzero", action="store_true", help="skip the full PretrainZero run of our side")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run file, for every side")
    return p


def run(args: argparse.Namespace) -> int:
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    s = compare(args.config, list(args.overrides), Path(args.out), args.steps, args.warmup, args.threads,
                not args.no_pretrainzero)
    print(f"benchmarks.compare: {s['workload']['prompts_per_step']} prompts x "
          f"{s['workload']['generations_per_prompt']} generations per step, {s['measured_steps']} measured step(s) "
          f"after {s['warmup_steps']} warm-up")
    print(text_table(s))
    print(_load_note(s))
    print(_measuring_note(s))
    print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: exit 0, or 2 with one line on stderr for a user error (bad config, TRL missing)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"python -m benchmarks.compare: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
