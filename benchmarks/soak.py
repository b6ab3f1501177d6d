"""A long run of the tiny policy, watched from outside: memory, step time, open files, threads and the run folder.

    python -m benchmarks.soak --steps 300 --out runs/soak          # ~300 steps, saves every 10, overlap on

The real entry point (``megatron-pz train``, ``examples/quickstart_cpu.yaml``) on a 2-layer random Llama with
SmolLM2's tokenizer, Random-span with a reward that has variance (``tests/e2e/plugin_rewards.py``: the weights move
every step), ``rollout.max_staleness=1`` (the next batch is generated while a step trains), a checkpoint every
``--save-interval`` steps with ``checkpoint.keep_last`` and the disk weight sync's pruning. A sampler reads
``/proc`` every ``--every-s`` seconds: the resident memory, open file descriptors and threads of the trainer's
process tree (the trainer and its rollout server), and the bytes under the run folder (checkpoints/, weights/,
and the logs that grow by design: metrics, samples, TensorBoard). Each step gets the last sample taken before its
end (``metrics.jsonl``'s ``time``).

After ``--warmup`` steps (allocators and caches settle), per 100 steps: the least-squares slope of RSS and of
``time/step``, as a fraction of their mean; the range of descriptors and threads; checkpoints/ + weights/ at their
largest in the first and the second half. Memory, descriptors and threads are judged on the steady samples (those
with the run's usual number of processes: a save's checkpoint workers come and go with their own memory and files).
Criteria: steady RSS grows < 1 % per 100 steps; the steady median of descriptors and of threads in the last quarter
is not above the first quarter's (a leak climbs); checkpoints + weights in the second half at most 5 % above their
first-half peak. Step time is reported with its slope but not judged by the exit
code: on a shared machine it measures the neighbours as much as the run (figures belong to a quiet machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train.objective=random_span", "reward.pred_reward=plugin_rewards:odd_length",
         "train.paragraphs_per_step=2", "train.masks_per_paragraph=2", "train.predictions_per_mask=4",
         "rollout.gen_max_new_tokens=16", "rollout.pred_max_new_tokens=12", "corpus.max_prompt_tokens=200",
         "logging.progress_bar=false", "rollout.max_staleness=1"]


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/<pid>/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = Path(f"/proc/{p}/task/{t.name}/children")
                todo += [int(c) for c in kids.read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def proc_stats(pid: int) -> dict[str, int]:
    """RSS bytes, open descriptors, threads and processes of ``pid``'s tree (0s for a process that is gone)."""
    rss = fds = threads = procs = 0
    for p in tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            n_fd = len(os.listdir(f"/proc/{p}/fd"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        rss += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        threads += int(fields.get("Threads", "0").strip())
        fds += n_fd
        procs += 1
    return {"rss": rss, "fds": fds, "threads": threads, "procs": procs}


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:  # pruned while we walked
                pass
    return total


def run_folder(out: Path) -> dict[str, int]:
    kept = folder_bytes(out / "checkpoints") + folder_bytes(out / "weights")
    return {"kept_bytes": kept, "log_bytes": folder_bytes(out) - kept}


class Sampler(threading.Thread):
    def __init__(self, pid: int, out: Path, every_s: float):
        super().__init__(daemon=True)
        self.pid, self.out, self.every_s = pid, out, every_s
        self.samples: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append({"time": time.time(), **proc_stats(self.pid), **run_folder(self.out)})
            self._halt.wait(self.every_s)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join()
        return self.samples


def per_step(rows: list[dict], samples: list[dict]) -> list[dict]:
    """Each metrics row with the last sample taken before its end (rows without one are left out)."""
    out, i = [], 0
    for r in rows:
        while i < len(samples) and samples[i]["time"] <= r["time"]:
            i += 1
        if i:
            out.append({"step": r["step"], "step_s": r.get("time/step"), **{k: v for k, v in samples[i - 1].items()
                                                                             if k != "time"}})
    return out


def slope_per_100(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, times 100, divided by the mean of ys (a fraction per 100 steps)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0 or my == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var * 100 / my


def judge(steps: list[dict], warmup: int) -> dict:
    """The criteria over the steps after ``warmup``. Memory, descriptors and threads are judged on the steady
    samples: those taken with the run's usual number of processes (the most common count). A save's checkpoint
    workers come and go with their own memory and files (up to +1.3 GiB and +240 descriptors here); a sample that
    catches one says when the sampler woke, not whether the long-lived processes leak."""
    after = [s for s in steps if s["step"] > warmup]
    if len(after) < 4:
        raise SystemExit(f"soak: {len(after)} steps after the warm-up of {warmup}: run more steps")
    counts = [s["procs"] for s in after]
    usual = max(set(counts), key=counts.count)
    steady = [s for s in after if s["procs"] == usual]
    xs = [s["step"] for s in steady]
    half, quarter = len(after) // 2, max(1, len(steady) // 4)
    kept_first, kept_second = max(s["kept_bytes"] for s in after[:half]), max(s["kept_bytes"] for s in after[half:])
    timed = [s for s in after if s["step_s"] is not None]
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    first_last = {k: [median([s[k] for s in steady[:quarter]]), median([s[k] for s in steady[-quarter:]])]
                  for k in ("fds", "threads")}
    r = {"steps_judged": [after[0]["step"], after[-1]["step"]], "usual_processes": usual,
         "steady_samples": len(steady),
         "rss_mib_first_last": [steady[0]["rss"] / 2**20, steady[-1]["rss"] / 2**20],
         "rss_growth_per_100_steps": slope_per_100(xs, [s["rss"] for s in steady]),
         "step_s_mean": sum(s["step_s"] for s in timed) / max(1, len(timed)),
         "step_s_growth_per_100_steps": slope_per_100([s["step"] for s in timed], [s["step_s"] for s in timed]),
         "fds_range": [min(s["fds"] for s in after), max(s["fds"] for s in after)],
         "fds_median_first_last_quarter": first_last["fds"],
         "threads_range": [min(s["threads"] for s in after), max(s["threads"] for s in after)],
         "threads_median_first_last_quarter": first_last["threads"],
         "procs_range": [min(counts), max(counts)],
         "kept_mib_max_first_second_half": [kept_first / 2**20, kept_second / 2**20],
         "log_mib_last": after[-1]["log_bytes"] / 2**20}
    # A leak climbs: the steady count of the last quarter must not exceed that of the first.
    r["ok"] = {"rss": r["rss_growth_per_100_steps"] < 0.01,
               "fds": first_last["fds"][1] <= first_last["fds"][0],
               "threads": first_last["threads"][1] <= first_last["threads"][0],
               "kept_bounded": kept_second <= kept_first * 1.05}
    return r


def report(r: dict) -> str:
    ok = r["ok"]
    mark = lambda k: "ok" if ok[k] else "FAILED"  # noqa: E731
    return "\n".join([
        f"steps {r['steps_judged'][0]}..{r['steps_judged'][1]} (after the warm-up)",
        f"steady samples (with {r['usual_processes']} processes): {r['steady_samples']}",
        f"RSS (trainer + server) {r['rss_mib_first_last'][0]:.0f} -> {r['rss_mib_first_last'][1]:.0f} MiB, slope "
        f"{100 * r['rss_growth_per_100_steps']:+.2f} % per 100 steps ({mark('rss')}: < 1 %)",
        f"step time mean {r['step_s_mean']:.2f} s, slope {100 * r['step_s_growth_per_100_steps']:+.2f} % per 100 "
        f"steps (reported, not judged)",
        f"open descriptors {r['fds_range'][0]}..{r['fds_range'][1]}, steady median {r['fds_median_first_last_quarter']} "
        f"in the first and last quarter ({mark('fds')}: no climb); threads {r['threads_range'][0]}.."
        f"{r['threads_range'][1]}, steady median {r['threads_median_first_last_quarter']} ({mark('threads')}); processes "
        f"{r['procs_range'][0]}..{r['procs_range'][1]}",
        f"checkpoints + weights at most {r['kept_mib_max_first_second_half'][0]:.1f} MiB in the first half, "
        f"{r['kept_mib_max_first_second_half'][1]:.1f} MiB in the second ({mark('kept_bounded')}); logs "
        f"{r['log_mib_last']:.1f} MiB (grow by design)"])


def tiny_policy(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_policy  # the tests' tiny policy: 2 random layers, SmolLM2's tokenizer

    from megatron_pz.convert.smollm2 import prepare_smollm2

    if (folder / "config.json").is_file():
        return str(folder)
    return str(save_tiny_policy(folder, prepare_smollm2()[0]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the judgement")
    ap.add_argument("--save-interval", type=int, default=10)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--every-s", type=float, default=1.0, help="seconds between samples of /proc")
    ap.add_argument("--policy", default=None, help="an HF folder (default: the tests' tiny policy, made once)")
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("overrides", nargs="*", help="more run-file overrides (key=value)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    run = out / "run"
    policy = args.policy or tiny_policy(out / "tiny_policy")
    cmd = [sys.executable, "-m", "megatron_pz.cli", "train", "--config", str(ROOT / "examples/quickstart_cpu.yaml"),
           f"policy.load={policy}", f"output_dir={run}", f"train.steps={args.steps}", *TRAIN,
           f"checkpoint.save_interval={args.save_interval}", f"checkpoint.keep_last={args.keep_last}",
           *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "e2e"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with (out / "console.log").open("w") as console:
        proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = Sampler(proc.pid, run, args.every_s)
        sampler.start()
        rc = proc.wait()
        samples = sampler.stop()
    if rc != 0:
        print(f"soak: the run exited with {rc}: see {out / 'console.log'}", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = per_step([r for r in rows if r.get("step", 0) >= 1 and "time/step" in r], samples)
    result = {"command": cmd, "wall_s": time.time() - t0, **judge(steps, args.warmup)}
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "soak_steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    print(report(result))
    print(f"wall time {result['wall_s'] / 60:.1f} min; figures in {out / 'soak.json'}")
    return 0 if all(result["ok"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
