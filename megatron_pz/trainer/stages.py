"""Staged run files: one command runs several run files in order, each continuing from the previous one.

A staged run file holds only ``name``, ``output_dir`` and ``stages``, a list of run files (paths relative to the
staged file) with optional per-stage overrides::

    name: quickstart
    output_dir: runs/quickstart
    stages:
      - config: smollm2_restate_warmup.yaml
        overrides: [train.steps=8]
      - config: smollm2_restate_pretrainzero.yaml
        heldout: 64

Stage k trains into ``<output_dir>/<its name>``; from the second stage on, ``policy.load`` is the previous stage's
``checkpoints/`` (its newest weights; optimizer, schedule and step start fresh: ``trainer/setup.py``
``load_initial_weights``), as the paper's cold start hands over to PretrainZero [PZ §4.1]. Overrides given on the
command line apply to every stage, after the stage's own, except ``output_dir`` (the staged run's folder) and
``policy.load`` (the first stage's starting weights). A finished stage (its checkpoint is at its last step) is
skipped, an unfinished one resumes, so re-running the command continues where it stopped. Each stage runs in a
fresh process (memory is returned between stages); staged files are launched by ``megatron-pz train`` itself, so
under ``torchrun`` launch each stage's run file instead.

``heldout: N`` scores a stage held out once it has trained: ``megatron-pz heldout`` on N one-word spans of the
shipped validation sample (``assets/wiki_sample/valid``: articles no training split holds; shipped, so a fresh
clone needs no other data), with the stage's prediction prompt, at the stage's starting weights and at its end, and prints
one line: the mean p(span) at both and their paired change with a 95 % interval (``eval.heldout_stats``). The
scorers' output goes to ``<stage>/heldout/heldout.log``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_pz.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    config: Path
    overrides: tuple[str, ...]
    name: str
    output_dir: Path
    steps: int
    start: str = ""  # the stage's starting weights (policy.load)
    heldout: int = 0  # held-out items scored at the start and the end (0: none)


def is_staged(data: object) -> bool:
    return isinstance(data, dict) and "stages" in data


def plan_stages(path: Path, data: dict, cli_overrides: list[str]) -> list[Stage]:
    """The stages of the staged run file ``path`` (already read as ``data``), with their resolved configs."""
    from megatron_pz.config import load_config

    extra = sorted(set(data) - {"name", "output_dir", "stages"})
    if extra:
        raise ConfigError(f"{path}: a staged run file holds name, output_dir and stages only; move {extra} into "
                          f"a stage's run file")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: stages must be a non-empty list of {{config: FILE, overrides: [...]}}")
    # On the command line, output_dir is the staged run's folder and policy.load the first stage's start; every
    # other override applies to every stage.
    root = Path(str(data.get("output_dir") or Path("runs") / str(data.get("name") or path.stem)))
    first_load: list[str] = []
    for o in list(cli_overrides):
        if o.startswith("output_dir="):
            root = Path(o.split("=", 1)[1])
        elif o.startswith("policy.load="):
            first_load = [o]
        else:
            continue
        cli_overrides = [x for x in cli_overrides if x != o]
    out: list[Stage] = []
    for i, entry in enumerate(stages, 1):
        if isinstance(entry, str):
            entry = {"config": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), str) or \
                set(entry) - {"config", "overrides", "heldout"}:
            raise ConfigError(f"{path}: stages[{i - 1}] must be {{config: FILE, overrides: [key=value, ...], "
                              f"heldout: N}}, got {entry!r}")
        heldout = entry.get("heldout", 0)
        if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0:
            raise ConfigError(f"{path}: stages[{i - 1}].heldout must be a number of held-out items >= 0, "
                              f"got {heldout!r}")
        own = entry.get("overrides") or []
        if not isinstance(own, list) or not all(isinstance(o, str) and "=" in o for o in own):
            raise ConfigError(f"{path}: stages[{i - 1}].overrides must be a list of key=value strings")
        cfg_path = (path.parent / entry["config"]).resolve()
        if not cfg_path.is_file():
            raise ConfigError(f"{path}: stages[{i - 1}].config: no run file {cfg_path}")
        probe = load_config(cfg_path, [*own, *cli_overrides])
        output = root / probe.name
        chained = [f"output_dir={output}"] + ([f"policy.load={out[-1].output_dir / 'checkpoints'}"] if out else
                                              first_load)
        overrides = (*own, *cli_overrides, *chained)
        cfg = load_config(cfg_path, list(overrides))  # validates the stage as it will run
        out.append(Stage(cfg_path, overrides, probe.name, output, cfg.train.steps, str(cfg.policy.load), heldout))
    return out


def finished(output_dir: Path, steps: int) -> bool:
    """A run in ``output_dir`` has a checkpoint at step ``steps`` or later (its tracker says so)."""
    from megatron_pz.checkpoint.layout import TRACKER

    try:
        return int((output_dir / "checkpoints" / TRACKER).read_text().strip()) >= steps
    except (OSError, ValueError):
        return False


def run_stages(path: Path, data: dict, cli_overrides: list[str]) -> int:
    """Run every stage in order, each as ``megatron-pz train`` in its own process; the first failure ends it.
    The runner's own lines, and the warnings reading the stages' configs raised, go to ``<output_dir>/train.log``."""
    from megatron_pz.logs import configure_console, say

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{path}: a staged run file is launched by megatron-pz train itself; under torchrun "
                          f"launch each stage's run file")
    stages = plan_stages(path, data, cli_overrides)
    configure_console(stages[0].output_dir.parent, 0)
    for i, st in enumerate(stages, 1):
        head = f"stage {i}/{len(stages)} {st.name}"
        if finished(st.output_dir, st.steps):
            say(f"{head}: done earlier ({st.output_dir}/checkpoints at step {st.steps}), skipped")
            continue
        say(f"{head}: {st.config.name} -> {st.output_dir}" + (f" (from stage {i - 1}'s weights)" if i > 1 else ""))
        rc = subprocess.call([sys.executable, "-m", "megatron_pz.cli", "train", "--config", str(st.config),
                              *st.overrides])
        if rc != 0:
            say(f"{head}: exit {rc}; rerun the same command to resume it")
            return rc
        if st.heldout:
            say(f"{head}: {heldout_change(st)}")
    return 0


def heldout_change(st: Stage) -> str:
    """Score the stage's start and end on ``st.heldout`` validation items (two ``megatron-pz heldout`` processes)
    and describe the change of the mean p(span) in one line."""
    from megatron_pz.data.shards import sample_corpus_path
    from megatron_pz.eval.heldout_stats import compare

    folder = st.output_dir / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    data = sorted(sample_corpus_path("valid").glob("shard-*.jsonl"))[0]
    common = ["--data", str(data), "--items", str(st.heldout), "--config", str(st.config)]
    # The end is this stage's own checkpoint, so unchanged weights are no mix-up here: a stage that trained no
    # token (no valid mask in a short run) reports max|dw| 0 and a change of 0 instead of failing.
    points = {"start": [st.start, "--allow-unchanged"], "end": [str(st.output_dir), "--allow-unchanged"]}
    docs = {}
    with open(folder / "heldout.log", "a", encoding="utf-8") as log:
        for name, (load, *extra) in points.items():
            out = folder / f"{name}.json"
            rc = subprocess.call([sys.executable, "-m", "megatron_pz.cli", "heldout", "--load", load, "--reference",
                                  st.start, *extra, *common, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)
            if rc != 0:
                return f"held-out scoring of the {name} weights failed (exit {rc}; see {folder / 'heldout.log'})"
            docs[name] = json.loads(out.read_text(encoding="utf-8"))
    a, b = docs["start"], docs["end"]
    iv = compare(a["records"], b["records"], "p")
    return (f"held-out p(span) on {iv.n} validation spans: {a['summary']['mean_p']:.4f} at the start, "
            f"{b['summary']['mean_p']:.4f} at the end (iteration {b['iteration']}, max|dw| {b['max_abs_dw']:.2g}); "
            f"change {iv.estimate:+.4f}, 95 % [{iv.low:+.4f}, {iv.high:+.4f}] (paired, bootstrap over "
            f"{iv.clusters} articles)")
