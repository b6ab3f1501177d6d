"""Staged run files: one command runs several run files in order, each continuing from the previous one.

A staged run file holds only ``name``, ``output_dir`` and ``stages``, a list of run files (paths relative to the
staged file) with optional per-stage overrides::

    name: quickstart
    output_dir: runs/quickstart
    stages:
      - config: smollm2_restate_warmup.yaml
        overrides: [train.steps=8]
      - config: smollm2_restate_pretrainzero.yaml

Stage k trains into ``<output_dir>/<its name>``; from the second stage on, ``policy.load`` is the previous stage's
``checkpoints/`` (its newest weights; optimizer, schedule and step start fresh: ``trainer/setup.py``
``load_initial_weights``), as the paper's cold start hands over to PretrainZero [PZ §4.1]. Overrides given on the
command line apply to every stage, after the stage's own, except ``output_dir`` (the staged run's folder) and
``policy.load`` (the first stage's starting weights). A finished stage (its checkpoint is at its last step) is
skipped, an unfinished one resumes, so re-running the command continues where it stopped. Each stage runs in a
fresh process (memory is returned between stages); staged files are launched by ``megatron-pz train`` itself, so
under ``torchrun`` launch each stage's run file instead.
"""
from __future__ import annotations

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
                set(entry) - {"config", "overrides"}:
            raise ConfigError(f"{path}: stages[{i - 1}] must be {{config: FILE, overrides: [key=value, ...]}}, "
                              f"got {entry!r}")
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
        out.append(Stage(cfg_path, overrides, probe.name, output, cfg.train.steps))
    return out


def finished(output_dir: Path, steps: int) -> bool:
    """A run in ``output_dir`` has a checkpoint at step ``steps`` or later (its tracker says so)."""
    from megatron_pz.checkpoint.layout import TRACKER

    try:
        return int((output_dir / "checkpoints" / TRACKER).read_text().strip()) >= steps
    except (OSError, ValueError):
        return False


def run_stages(path: Path, data: dict, cli_overrides: list[str]) -> int:
    """Run every stage in order, each as ``megatron-pz train`` in its own process; the first failure ends it."""
    from megatron_pz.logs import say

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{path}: a staged run file is launched by megatron-pz train itself; under torchrun "
                          f"launch each stage's run file")
    stages = plan_stages(path, data, cli_overrides)
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
    return 0
