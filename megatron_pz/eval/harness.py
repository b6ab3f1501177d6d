"""lm-evaluation-harness tasks over an OpenAI-compatible server (the embedded one, or SGLang).

``run_harness`` runs ``lm_eval.simple_evaluate`` with the ``local-completions`` model on ``<url>/v1/completions``:
requests go as token ids (``tokenized_requests``), counted and cut with the policy's own HF tokenizer read from a
local folder (``tokenizer_backend="huggingface"``), so nothing is downloaded. Log-likelihood tasks send
``echo=true, logprobs=1, max_tokens=1``, generation tasks greedy completions with the task's stop strings.

Task YAMLs are found in ``megatron_pz/assets/harness/`` (always; its tasks read their data from that folder) and in
each ``include`` folder (lm-eval's ``TaskManager(include_path=...)``). lm-eval's own task registry (thousands of
YAMLs, ~20 s to index) is read only when a task is in neither; its tasks need their datasets in the local HF cache,
since the run is offline (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``).

Used by ``megatron-pz eval --harness`` (``eval/cli.py``, ``eval/harness_cli.py``) and by training's ``eval.harness``
(``evaluate_harness``), whose metrics are logged as ``eval/<task>/<metric>`` like the built-in suites'.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pz.errors import ConfigError, RolloutError

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "harness"
"""The shipped tasks (``pz_wiki_lastword``); see the README there."""

# Offline (the datasets and hub libraries read these), and bootstrap standard errors in-process: lm-eval's default
# forks a process pool, which a process holding a server thread (or CUDA) must not do.
HARNESS_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}
BOOTSTRAP_ITERS = 1000
REQUEST_TIMEOUT_S = 3600  # one request of batch_size prompts on a CPU engine can take minutes


@contextlib.contextmanager
def harness_env() -> Iterator[None]:
    """``HARNESS_ENV`` set for the duration, and every variable it or ``run_harness`` sets (``OPENAI_API_KEY``)
    restored after. A fresh ``megatron-pz eval`` process sets ``HARNESS_ENV`` before the hub libraries are imported
    (they read the offline flags once); inside a trainer they may have been imported already, and the shipped
    tasks need no network either way."""
    old = {k: os.environ.get(k) for k in (*HARNESS_ENV, "OPENAI_API_KEY")}
    os.environ.update(HARNESS_ENV)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_installed() -> None:
    """ConfigError unless lm-eval and what its API models import (its [api] extra, less tiktoken) are installed."""
    import importlib.util

    missing = [m for m in ("lm_eval", "aiohttp", "tenacity") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"lm-evaluation-harness tasks need lm-eval and its API client ({', '.join(missing)} not "
                          "installed): pip install 'megatron-pz[eval]'")


def include_paths(include: Sequence[str | os.PathLike] = (), flag: str = "--harness-include") -> list[Path]:
    """The shipped task folder, then each ``include`` folder (ConfigError naming ``flag`` for one that is not a
    folder)."""
    paths = [ASSETS]
    for p in include:
        if not Path(p).is_dir():
            raise ConfigError(f"{flag} {p}: not a folder")
        paths.append(Path(p).resolve())
    return paths


def task_manager(tasks: Sequence[str], include: Sequence[str | os.PathLike] = (), flag: str = "--harness-include"):
    """A ``TaskManager`` that knows every name in ``tasks``; ConfigError naming the unknown ones (``flag``: the
    option or config key that adds task folders, for the message)."""
    check_installed()
    from lm_eval.tasks import TaskManager

    paths = include_paths(include, flag)
    tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if not all(tm.match_tasks([t]) for t in tasks):
        logger.info("harness: indexing lm-eval's own tasks (about 20 s)")
        tm = TaskManager(include_path=[str(p) for p in paths])
    unknown = [t for t in tasks if not tm.match_tasks([t])]
    if unknown:
        raise ConfigError(f"unknown lm-evaluation-harness task(s): {', '.join(unknown)} (shipped: "
                          f"{', '.join(sorted(p.stem for p in ASSETS.glob('*.yaml')))}; add your YAMLs with "
                          f"{flag} DIR)")
    return tm


def parse_tasks(value: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (value.split(",") if isinstance(value, str) else value)]
    if not names or any(not t for t in names):
        raise ConfigError(f"--harness {','.join(value) if not isinstance(value, str) else value!r}: expected task "
                          "names, comma-separated")
    return names


@dataclass
class HarnessResult:
    metrics: dict[str, dict[str, float]]
    """task (or group) -> metric -> value; lm-eval's ``metric,filter`` keys become ``metric`` for the ``none``
    filter and ``metric_filter`` otherwise."""
    samples: dict[str, int]
    """task -> documents evaluated."""
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    """lm-eval's results, versions, n-shot, higher_is_better and task configs (JSON-safe, no API key)."""


def served_model(url: str, api_key: str | None) -> tuple[str, int | None]:
    """(model name, context length) from ``<url>/v1/models``; RolloutError when the server does not answer it."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = requests.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        card = r.json()["data"][0]
        length = card.get("max_model_len")
        return str(card["id"]), int(length) if isinstance(length, int) and length > 0 else None
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as exc:
        raise RolloutError(f"{url}/v1/models: {type(exc).__name__}: {exc} (is it an SGLang or megatron-pz "
                           "serve-rollout server, and is the API key right?)") from None


def adds_special_tokens(tokenizer_dir: str | os.PathLike) -> bool:
    """Whether the HF tokenizer in ``tokenizer_dir`` adds tokens (a BOS) to plain text by default."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return tok.encode("a") != tok.encode("a", add_special_tokens=False)


def run_harness(url: str, tasks: Sequence[str], tokenizer_dir: str | os.PathLike, *, api_key: str | None = None,
                include: Sequence[str | os.PathLike] = (), limit: int | float | None = None,
                num_fewshot: int | None = None, seed: int = 0, batch_size: int = 8,
                max_gen_toks: int = 256) -> HarnessResult:
    """lm-eval's ``tasks`` against the server at ``url`` (see the module docstring); ``limit``: documents per task
    (lm-eval's first ``limit``); ``batch_size``: prompts per request."""
    tasks = parse_tasks(tasks)
    t0 = time.perf_counter()
    with harness_env():
        tm = task_manager(tasks, include)
        from lm_eval import simple_evaluate

        model, context = served_model(url, api_key)
        model_args: dict[str, Any] = {
            "model": model, "base_url": url.rstrip("/") + "/v1/completions", "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": batch_size,
            "num_concurrent": 1, "max_retries": 3, "seed": seed, "timeout": REQUEST_TIMEOUT_S,
            "max_gen_toks": max_gen_toks}
        if context:
            model_args["max_length"] = context
        if adds_special_tokens(tokenizer_dir):
            # lm-eval's API models encode without special tokens unless told; its hf model encodes with the
            # tokenizer's defaults. A tokenizer that prepends BOS then scores the same text differently: keep HF's.
            model_args["add_bos_token"] = True
        # The key goes through lm-eval's own variable, not model_args: lm-eval logs its model arguments.
        os.environ["OPENAI_API_KEY"] = api_key or ""
        out = simple_evaluate(model="local-completions", model_args=model_args, tasks=list(tasks), limit=limit,
                              num_fewshot=num_fewshot, task_manager=tm, log_samples=False,
                              bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:
        raise RolloutError("lm-evaluation-harness returned no results")
    return summarize(out, time.perf_counter() - t0)


def summarize(out: dict[str, Any], seconds: float) -> HarnessResult:
    """``HarnessResult`` of lm-eval's ``simple_evaluate`` output."""
    metrics: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, values in (out.get(section) or {}).items():
            row = metrics.setdefault(task, {})
            for key, value in values.items():
                name, _, filt = key.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and filt:
                    row[name if filt == "none" else f"{name}_{filt}"] = float(value)
    samples = {t: int(v.get("effective", 0)) for t, v in (out.get("n-samples") or {}).items()}
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    report = json.loads(json.dumps({k: out[k] for k in keep if k in out}, default=str))
    return HarnessResult(metrics, samples, seconds, report)


def text_table(result: HarnessResult) -> str:
    """One line per (task, metric): value and its standard error."""
    rows = [["task", "metric", "value", "± stderr", "n"]]
    for task, m in result.metrics.items():
        for name, value in m.items():
            if name.endswith("_stderr") or "_stderr_" in name:
                continue
            err = m.get(f"{name}_stderr")
            rows.append([task, name, _num(value), "" if err is None else _num(err), str(result.samples.get(task, ""))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _num(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def write_report(result: HarnessResult, out_dir: str | os.PathLike, header: dict[str, Any]) -> Path:
    """``<out_dir>/harness.json``: the header (model, server, tasks, settings), the metrics and lm-eval's report."""
    path = Path(out_dir) / "harness.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**header, "seconds": round(result.seconds, 1), "metrics": result.metrics, "samples": result.samples,
            "lm_eval": result.report}
    path.write_text(json.dumps(body, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def pool_target(pool: Any) -> tuple[str, str | None]:
    """(URL, API key) of the server a rollout pool generates on: its router, else its first server."""
    server = getattr(pool, "router", None) or pool.servers[0]
    return server.client.base_url, server.client.config.api_key


def evaluate_harness(pool: Any, tokenizer: Any, tasks: Sequence[str], include: Sequence[str], limit: int,
                     seed: int) -> dict[str, dict[str, float]]:
    """Training's ``eval.harness``: the tasks on the pool's server, with the run's HF tokenizer (``tokenizer.tok``, a
    local folder); ``{task: metrics}`` as ``runner.evaluate`` returns them."""
    hf = getattr(tokenizer, "tok", None)
    folder = getattr(hf, "name_or_path", None)
    if not folder or not Path(folder).is_dir():
        raise ConfigError("eval.harness needs the run's HF tokenizer folder (a SentencePiece .model file is not "
                          "enough for lm-evaluation-harness)")
    url, key = pool_target(pool)
    result = run_harness(url, tasks, folder, api_key=key, include=include, limit=limit, seed=seed)
    return {task: {**m, "n": float(result.samples.get(task, 0))} for task, m in result.metrics.items()}
