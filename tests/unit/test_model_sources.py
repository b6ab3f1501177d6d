"""Every command that takes a model takes the same sources (``convert.source``): 'smollm2', an HF folder, a Megatron
checkpoint root or iteration folder, a training run's folder; a bad one is one line naming the flag, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pz import cli
from megatron_pz.convert.source import hf_model
from megatron_pz.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[2]


def fake_run(root: Path, iteration: int = 5) -> Path:
    """A training run's folder as far as resolution reads it: the tracker, the iteration folder's markers and the
    tokenizer in hf_meta/ (no tensors: nothing here exports)."""
    it = root / "checkpoints" / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    for name in ("metadata.json", ".metadata"):
        (it / name).write_text("{}")
    (it / "megatron_pz.json").write_text(json.dumps({"arch": {"family": "llama"}}))
    (root / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    (root / "hf_meta").mkdir()
    (root / "hf_meta" / "tokenizer.json").write_text("{}")
    return root


def test_smollm2_resolves_to_its_hf_folder_for_every_command(smollm2):
    for what in ("--model", "--load", "--reference"):
        model = hf_model("smollm2", what=what)
        assert model.hf_dir == Path(smollm2[0]) == model.tokenizer and model.iteration is None
    from megatron_pz.engine.serve import resolve_model

    assert resolve_model("smollm2") == smollm2[0]


def test_a_run_folder_its_checkpoints_and_an_iteration_folder_name_the_same_weights(tmp_path):
    run = fake_run(tmp_path / "run")
    for load in (run, run / "checkpoints", run / "checkpoints" / "iter_0000005"):
        model = hf_model(str(load), export=False)
        assert model.hf_dir is None and model.iteration == 5 and model.tokenizer == run / "hf_meta", load
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert hf_model(str(folder)) == hf_model(str(folder), what="--model")
    assert hf_model(str(folder)).hf_dir == folder and hf_model(str(folder)).iteration is None


def test_a_bad_source_is_named_with_its_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--model='.*missing': no such file or directory"):
        hf_model(str(tmp_path / "missing"), what="--model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--reference='.*empty' is not 'smollm2', a Megatron checkpoint"):
        hf_model(str(tmp_path / "empty"), what="--reference")
    run = fake_run(tmp_path / "run")
    (run / "hf_meta" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"--load .*run: no HF tokenizer .*pass --tokenizer DIR"):
        hf_model(str(run), export=False)


def test_serve_rollout_serves_smollm2(smollm2, monkeypatch):
    """The command line as far as the engine: ``--model smollm2`` reaches it as the converted HF folder."""
    from megatron_pz.engine import engine

    class Served(Exception):
        pass

    def fake_engine(path, **kwargs):
        raise Served(path)

    monkeypatch.setattr(engine, "EmbeddedEngine", fake_engine)
    with pytest.raises(Served) as got:
        cli.main(["serve-rollout", "--model", "smollm2", "--port", "0"])
    assert str(got.value) == smollm2[0]


@pytest.mark.parametrize("command, flag", [(["serve-rollout", "--model"], "--model"),
                                           (["heldout", "--split", "valid", "--reference", "smollm2", "--load"], "--load"),
                                           (["eval", "--suite", "wiki_span", "--load"], "--load")])
def test_a_missing_source_is_one_line_and_exit_2(tmp_path, command, flag):
    bad = tmp_path / "no_such_model"
    p = subprocess.run([sys.executable, "-m", "megatron_pz.cli", *command, str(bad)], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megatron-pz {command[0]}: error: {flag}='{bad}'"), lines


def test_convert_takes_smollm2_and_a_run_folder(smollm2, tmp_path):
    from megatron_pz.convert.cli import source_path

    assert source_path("smollm2", "hf") == smollm2[0]
    assert source_path("smollm2", "mcore") == smollm2[1]
    run = fake_run(tmp_path / "run")
    assert source_path(str(run), "mcore") == str(run / "checkpoints")
    assert source_path(str(run / "checkpoints"), "mcore") == str(run / "checkpoints")
    assert source_path(str(tmp_path), "mcore") == str(tmp_path)  # not a source: the converter names what it lacks
