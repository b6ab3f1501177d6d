"""``megatron-pz bench [compare]``: the same PretrainZero workload through this project and through TRL, side by side.

    megatron-pz bench                                    # = bench compare --config examples/bench_cpu.yaml
    megatron-pz bench compare --config examples/bench_cpu.yaml --out runs/bench/compare [key=value ...]

Sides, each in its own process (peak RSS is per side: the process and all its children, sampled every 0.1 s):
  ours      ``megatron-pz train`` with ``train.objective=random_span`` and ``advantage.dapo_filter=false``
            (every sample is trained, as TRL trains every sample): Megatron trainer + embedded rollout server
  trl       TRL ``GRPOTrainer`` on the same HF weights, prompts (token ids), targets, group layout and
            hyper-parameters (``bench.sides`` lists what is matched), CPU, fp32, TRL's own generation
  generate  plain ``transformers`` ``generate`` on the same prompts x generations, lengths and batch
  pretrainzero  (unless --no-pretrainzero) our full PretrainZero step (generator + predictor), reported apart
Prompts come from ``bench.workload`` (the trainer's own corpus reader and seeds); the bench checks that the
paragraphs our trainer logged in data_order.jsonl are the ones the other sides got.

Figures per side, over the steps after ``--warmup``: step time (ours without checkpoint saving: TRL saves
nothing), rollout tokens/s = generated tokens / rollout phase time, train tokens/s = prompt + response tokens of
the trained samples (no padding) / train phase time, peak RSS; ratios ours/TRL. Ours also: achieved train FLOP/s
= 6 x parameters x trained tokens / train time (the dense 6NT rule: forward + backward, attention FLOPs not
counted) over this process's measured fp32 matmul FLOP/s (``measure.matmul_gflops``); rollout tokens/s over plain
generate; weight-sync seconds; the share of the step in rollout / train / sync / save / idle (idle = step - the
phases). Writes <out>/bench.json and <out>/bench.md, and prints the table. ``uptime`` load averages are recorded
before and after each side: the figures are only comparable at similar load.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_pz.errors import UserError

DEFAULT_CONFIG = "examples/bench_cpu.yaml"
OURS_OVERRIDES = ["train.objective=random_span", "advantage.dapo_filter=false", "logging.progress_bar=false",
                  "logging.tensorboard=false", "checkpoint.save_interval=0"]


# ------------------------------------------------------------------------------------------- process helpers
def require_trl() -> str:
    """TRL's version, or a one-line UserError."""
    try:
        import trl
    except ImportError:
        raise UserError("bench compare needs TRL: pip install 'megatron_pz[bench]' (or bash tools/install.sh)") \
            from None
    return trl.__version__


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _rss_bytes(pid: int) -> int:
    """Resident set of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and all its descendants (Linux /proc). Pages shared between them count once per process."""
    return sum(_rss_bytes(p) for p in _tree(pid))


def tree_pss_bytes(pid: int) -> int:
    """PSS of ``pid`` and its descendants: each shared page is split among the processes mapping it, so forked
    workers (Megatron's checkpoint writers fork the trainer) are not counted as full copies. Falls back to RSS
    where smaps_rollup is unreadable."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))
        except (OSError, StopIteration, ValueError, IndexError):
            total += _rss_bytes(p)
    return total


def run_side(name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
             timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run one side; returns wall time, peak tree RSS, load averages; raises UserError on failure."""
    import resource

    load_before = load_average()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    peak = peak_rss = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, tree_pss_bytes(proc.pid))
            peak_rss = max(peak_rss, tree_rss_bytes(proc.pid))
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                raise UserError(f"bench: side {name!r} ran past {timeout_s:.0f} s; log: {log_path}")
            time.sleep(0.1)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise UserError(f"bench: side {name!r} failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the side's whole process tree (set-up and warm-up included): less sensitive than wall time to
    # other jobs on a shared machine
    return {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime - cpu0, "peak_rss_bytes": peak,
            "peak_rss_sum_bytes": peak_rss,  # plain RSS summed over the tree (double-counts shared pages)
            "max_process_rss_bytes": ru.ru_maxrss * 1024,  # the largest single process waited for so far
            "load_before": load_before, "load_after": load_average()}


# ------------------------------------------------------------------------------------------- reductions (pure)
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ours_steps(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-step phase times and token counts from our metrics.jsonl rows."""
    out = []
    for r in rows:
        step = r.get("time/step", 0.0)
        gen_tokens = sum(r.get(f"count/{t}", 0.0) * r.get(f"length/{t}_mean", 0.0)
                         for t in ("random_span", "mask_pred", "mask_gen"))
        phases = {k: r.get(f"time/{k}", 0.0) for k in ("rollout", "train", "sync", "save")}
        out.append({"step": r["step"], "step_s": step, "step_no_save_s": step - phases["save"],
                    **{f"{k}_s": v for k, v in phases.items()},
                    "idle_s": step - sum(phases.values()), "generated_tokens": gen_tokens,
                    # throughput/tokens_per_s = prompt + response tokens of the step's samples / time/step
                    "trained_tokens": r.get("throughput/tokens_per_s", 0.0) * step,
                    "loss_tokens": r.get("train/tokens", 0.0)})
    return out


def summarize(ours: list[dict[str, float]], trl: list[dict[str, float]] | None, gen: list[dict[str, float]] | None,
              *, warmup: int, params: int, matmul_gflops: float, peak_rss: dict[str, int]) -> dict[str, Any]:
    """The bench's figures and ratios from measured per-step rows (steps after ``warmup`` only)."""
    o = ours[warmup:]
    if not o:
        raise UserError(f"bench: no measured steps after {warmup} warm-up step(s); raise --steps")
    ours_s = {**_side_summary(o, "step_no_save_s", peak_rss.get("ours", 0)),
              "step_with_save_s": _mean([r["step_s"] for r in o]), "sync_s": _mean([r["sync_s"] for r in o])}
    step_total = sum(r["step_s"] for r in o)
    ours_s["share"] = {k: _div(sum(r[f"{k}_s"] for r in o), step_total)
                       for k in ("rollout", "train", "sync", "save", "idle")}
    flops = 6.0 * params * sum(r["trained_tokens"] for r in o) / max(sum(r["train_s"] for r in o), 1e-12)
    ours_s["train_flops_per_s"] = flops
    ours_s["train_flops_over_matmul"] = _div(flops, matmul_gflops * 1e9)
    out: dict[str, Any] = {"warmup_steps": warmup, "measured_steps": len(o), "params": params,
                           "matmul_gflops": matmul_gflops, "ours": ours_s}
    if trl is not None:
        t = trl[warmup:]
        if not t:
            raise UserError("bench: TRL reported no steps after the warm-up")
        trl_s = _side_summary(t, "step_s", peak_rss.get("trl", 0))
        out["trl"] = trl_s
        out["ratio_ours_over_trl"] = {k: _div(ours_s[k], trl_s[k]) for k in
                                      ("step_s", "rollout_tokens_per_s", "train_tokens_per_s", "peak_rss_bytes")}
    if gen is not None:
        g = gen[warmup:] or gen
        g_tps = _div(sum(r["generated_tokens"] for r in g), sum(r["generate_s"] for r in g))
        out["generate"] = {"tokens_per_s": g_tps, "peak_rss_bytes": peak_rss.get("generate", 0)}
        out["ours"]["rollout_over_generate"] = _div(ours_s["rollout_tokens_per_s"], g_tps)
    return out


def _side_summary(rows: list[dict[str, Any]], step_key: str, peak_bytes: int) -> dict[str, float]:
    """The figures both sides report, over their measured steps: mean step time (``step_key``), generated tokens per
    rollout second, trained tokens per train second, peak memory, and the mean token counts."""
    return {
        "step_s": _mean([r[step_key] for r in rows]),
        "rollout_tokens_per_s": _div(sum(r["generated_tokens"] for r in rows), sum(r["rollout_s"] for r in rows)),
        "train_tokens_per_s": _div(sum(r["trained_tokens"] for r in rows), sum(r["train_s"] for r in rows)),
        "peak_rss_bytes": peak_bytes,
        "generated_tokens": _mean([r["generated_tokens"] for r in rows]),
        "trained_tokens": _mean([r["trained_tokens"] for r in rows]),
    }


# ------------------------------------------------------------------------------------------- tables
_ROWS = [("step time (s, lower is better)", "step_s", "{:.2f}"),
         ("rollout tokens/s", "rollout_tokens_per_s", "{:.1f}"),
         ("train tokens/s", "train_tokens_per_s", "{:.1f}"),
         ("peak memory (GB, process-tree PSS)", "peak_rss_bytes", "{:.2f}")]


def _fmt(key: str, fmt: str, v: Any) -> str:
    if v is None:
        return "-"
    return fmt.format(v / 1e9 if key == "peak_rss_bytes" else v)


def table_rows(s: dict[str, Any]) -> list[list[str]]:
    trl, ratio = s.get("trl", {}), s.get("ratio_ours_over_trl", {})
    rows = [["metric", "megatron_pz", "TRL GRPOTrainer", "ours / TRL"]]
    for label, key, fmt in _ROWS:
        rows.append([label, _fmt(key, fmt, s["ours"].get(key)), _fmt(key, fmt, trl.get(key)),
                     f"{ratio[key]:.2f}" if key in ratio else "-"])
    return rows


def extra_lines(s: dict[str, Any]) -> list[str]:
    o = s["ours"]
    lines = [(f"train FLOP/s (6 x {s['params'] / 1e6:.1f}M params x trained tokens / train time): "
              f"{o['train_flops_per_s'] / 1e9:.2f} GFLOP/s = {100 * o['train_flops_over_matmul']:.1f}% of measured "
              f"fp32 matmul {s['matmul_gflops']:.1f} GFLOP/s")]
    if "generate" in s:
        lines.append(f"rollout tokens/s over plain transformers generate: {o['rollout_tokens_per_s']:.1f} / "
                     f"{s['generate']['tokens_per_s']:.1f} = {o['rollout_over_generate']:.2f}")
    lines.append(f"weight sync: {o['sync_s']:.2f} s per step")
    sh = o["share"]
    lines.append("share of our step (with save): " + ", ".join(f"{k} {100 * sh[k]:.1f}%" for k in sh))
    if "pretrainzero" in s:
        p = s["pretrainzero"]
        lines.append(f"full PretrainZero step (ours): {p['step_s']:.2f} s (with save {p['step_with_save_s']:.2f}), "
                     f"rollout {p['rollout_tokens_per_s']:.1f} tok/s, {p.get('loss_tokens', 0):.0f} trained response "
                     f"tokens per step, shares " +
                     ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["share"].items()))
    return lines


def text_table(s: dict[str, Any]) -> str:
    rows = table_rows(s)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out + [""] + extra_lines(s))


def markdown_table(s: dict[str, Any]) -> str:
    rows = table_rows(s)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * 4]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(md + [""] + [f"- {x}" for x in extra_lines(s)]) + "\n"


# ------------------------------------------------------------------------------------------- the command
def hparams(cfg: Any) -> dict[str, Any]:
    o, loss = cfg.optim, cfg.loss
    return {"num_generations": cfg.train.predictions_per_mask, "micro_batch_size": cfg.train.micro_batch_size,
            "max_completion_length": cfg.pred_max_new_tokens, "temperature": cfg.rollout.temperature,
            "top_p": cfg.rollout.top_p, "lr": o.lr, "weight_decay": o.weight_decay, "adam_beta1": o.adam_beta1,
            "adam_beta2": o.adam_beta2, "adam_eps": o.adam_eps, "clip_grad": o.clip_grad, "eps_low": loss.eps_low,
            "eps_high": loss.eps_high}


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
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

    from megatron_pz.bench.measure import matmul_gflops
    from megatron_pz.bench.workload import build_workload
    from megatron_pz.config import load_config

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
    spec = {"workload": work.to_dict(), "hparams": hparams(rs_cfg), "seed": rs_cfg.train.seed,
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
            info[side] = run_side(side, [sys.executable, "-m", "megatron_pz.bench.sides", side, str(spec_path),
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
        # with the DAPO filter on, throughput/tokens_per_s counts filtered samples too: no train-token figures
        for k in ("train_tokens_per_s", "trained_tokens", "train_flops_per_s", "train_flops_over_matmul"):
            pz.pop(k, None)
        pz["loss_tokens"] = _mean([r["loss_tokens"] for r in pz_rows[warmup:]])
        summary["pretrainzero"] = pz
    summary.update({
        "command": " ".join(["megatron-pz", "bench", "compare", "--config", config, "--out", str(out),
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
                     "prompt_tokens_mean": _mean([len(p.ids) for s in work.steps for p in s.prompts])},
    })
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "bench.md").write_text(markdown_table(summary) + "\n" + _load_note(summary) + "\n")
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


def main_from_args(args: Any) -> int:
    s = compare(args.config, list(args.overrides), Path(args.out), args.steps, args.warmup, args.threads,
                not args.no_pretrainzero)
    print(f"megatron-pz bench compare: {s['workload']['prompts_per_step']} prompts x "
          f"{s['workload']['generations_per_prompt']} generations per step, {s['measured_steps']} measured step(s) "
          f"after {s['warmup_steps']} warm-up")
    print(text_table(s))
    print(_load_note(s))
    print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")
    return 0
