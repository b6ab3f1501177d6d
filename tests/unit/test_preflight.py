"""Every input a run reads is checked before any model is built, and each error names the key to set.

First the checks one by one (trainer/preflight.py), then the real entry point ``megatron-pz train`` with a bad
input: exit status 2 and one line on stderr naming the key, before process groups, model or servers exist.
"""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_pz import cli
from megatron_pz.config import flag_overrides, load_config
from megatron_pz.errors import CheckpointError, ConfigError, DataError
from megatron_pz.trainer.preflight import (
    check_corpus,
    check_eval_data,
    check_policy,
    check_resume,
    check_tokenizer,
    load_first_record,
    preflight,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "examples" / "quickstart_cpu.yaml")


def megatron_checkpoint(root: Path, iteration: int = 3, tokenizer: bool = True, arch: bool = True) -> Path:
    """A torch_dist checkpoint root in Megatron-LM's layout holding one real (tiny) tensor; returns its iter dir."""
    import torch
    import torch.distributed.checkpoint as dcp

    iter_dir = root / f"iter_{iteration:07d}"
    iter_dir.mkdir(parents=True)
    with warnings.catch_warnings():  # single process, no process group: dcp says so and saves
        warnings.simplefilter("ignore")
        dcp.save({"decoder.weight": torch.arange(64.0)}, checkpoint_id=str(iter_dir))
    (iter_dir / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    if arch:
        (iter_dir / "megatron_pz.json").write_text(json.dumps({"arch": {"family": "llama"}}))
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    if tokenizer:
        (root / "hf_tokenizer").mkdir()
        (root / "hf_tokenizer" / "tokenizer.json").write_text("{}")
    return iter_dir


def policy(**kw):
    return load_config(None, [f"policy.{k}={json.dumps(v)}" for k, v in kw.items()]).policy


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ------------------------------------------------------------------ policy.load
def test_a_whole_megatron_checkpoint_passes_by_root_run_folder_or_iteration(tmp_path):
    iter_dir = megatron_checkpoint(tmp_path / "run" / "checkpoints")
    for load in (tmp_path / "run", tmp_path / "run" / "checkpoints", iter_dir):
        assert check_policy(policy(load=str(load))).kind == "mcore"
    assert check_policy(policy(load="smollm2")) is None  # converted (and checked) by the resolver in setup


def test_a_broken_megatron_checkpoint_names_policy_load_and_the_file(tmp_path):
    iter_dir = megatron_checkpoint(tmp_path / "ck")
    load = str(tmp_path / "ck")
    shard = iter_dir / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:10])  # an interrupted copy
    with pytest.raises(CheckpointError, match=rf"policy\.load='{load}': checkpoint shard file .*__0_0\.distcp is "
                                              rf"truncated: 10 bytes"):
        check_policy(policy(load=load))
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"policy\.load=.*__0_0\.distcp is missing"):
        check_policy(policy(load=load))
    shard.write_bytes(data)
    (iter_dir / "megatron_pz.json").unlink()  # and no common.pt: nothing says what model this is
    with pytest.raises(CheckpointError, match=r"policy\.load=.*neither megatron_pz\.json nor common\.pt"):
        check_policy(policy(load=load))
    (iter_dir / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"policy\.load=.*incomplete: \.metadata is missing"):
        check_policy(policy(load=load))
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(CheckpointError, match=r"policy\.load=.*points at iter_0000007, which does not exist"):
        check_policy(policy(load=load))


def test_an_hf_folder_needs_readable_config_and_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "tokenizer.json").write_text("{}")
    save_file({"lm_head.weight": torch.zeros(2, 2)}, hf / "model.safetensors")
    preflight(load_config(QUICKSTART, [f"policy.load={hf}", f"output_dir={tmp_path / 'out'}"]))  # a whole one
    (hf / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"policy\.load='.*hf' is an HF model folder without a tokenizer .*set "
                                          r"policy\.tokenizer"):
        check_tokenizer(policy(load=str(hf)), check_policy(policy(load=str(hf))))
    (hf / "model.safetensors").unlink()
    (hf / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"policy\.load=.*config\.json is not a readable JSON file"):
        check_policy(policy(load=str(hf)))
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"policy\.load=.*no model\.safetensors\(\.index\.json\) or "
                                              r"pytorch_model\.bin"):
        check_policy(policy(load=str(hf)))


def test_the_run_to_resume_must_be_whole_unless_resuming_is_off(tmp_path):
    out = tmp_path / "out"
    iter_dir = megatron_checkpoint(out / "checkpoints")
    cfg = load_config(None, [f"output_dir={out}"])
    check_resume(cfg)
    (iter_dir / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match=r"output_dir='.*out' holds a checkpoint to resume from, but .*"
                                              r"metadata\.json is missing.*checkpoint\.auto_resume=false"):
        check_resume(cfg)
    check_resume(load_config(None, [f"output_dir={out}", "checkpoint.auto_resume=false"]))


# ------------------------------------------------------------------ policy.tokenizer
def test_tokenizer_from_the_checkpoint_or_policy_tokenizer(tmp_path):
    megatron_checkpoint(tmp_path / "a")
    own = policy(load=str(tmp_path / "a"))
    check_tokenizer(own, check_policy(own))  # its hf_tokenizer/ travels with it
    megatron_checkpoint(tmp_path / "mlm", tokenizer=False)  # Megatron-LM's own checkpoints carry none
    bare = policy(load=str(tmp_path / "mlm"))
    with pytest.raises(ConfigError, match=r"policy\.load=.*mlm' is a Megatron checkpoint without a tokenizer .*"
                                          r"set policy\.tokenizer \(--tokenizer\)"):
        check_tokenizer(bare, check_policy(bare))
    sp = tmp_path / "sp.model"
    sp.write_bytes(b"\x00")
    for good in (tmp_path / "a", tmp_path / "a" / "hf_tokenizer", sp):
        given = policy(load=str(tmp_path / "mlm"), tokenizer=str(good))
        check_tokenizer(given, check_policy(given))
    for bad, match in ((tmp_path / "nope", r"policy\.tokenizer='.*nope': no such file or directory"),
                       (tmp_path / "mlm", r"policy\.tokenizer='.*mlm' holds none of tokenizer\.json"),
                       (tmp_path / "mlm" / "latest_checkpointed_iteration.txt",
                        r"policy\.tokenizer=.* is a file but not a SentencePiece \.model")):
        with pytest.raises(ConfigError, match=match):
            check_tokenizer(policy(tokenizer=str(bad)), None)


# ------------------------------------------------------------------ corpus.paths / eval.data
def test_corpus_first_record_of_each_shard(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", "", '{"text": "one paragraph"}', "not json")  # only line 2 is read
    check_corpus(load_config(None, [f"corpus.paths=[{good}]"]).corpus)
    assert load_first_record(good) == (2, '{"text": "one paragraph"}\n')
    bad = jsonl(tmp_path / "bad.jsonl", '{"title": "no text"}')
    paths = f"corpus.paths=[{good}, {bad}]"
    with pytest.raises(DataError, match=r"corpus\.paths: .*bad\.jsonl:1: missing or empty 'text'; or set "
                                        r"corpus\.on_bad_line=skip"):
        check_corpus(load_config(None, [paths]).corpus)
    check_corpus(load_config(None, [paths, "corpus.on_bad_line=skip"]).corpus)  # the reader skips it
    with pytest.raises(DataError, match=r"corpus\.paths: .*missing\.jsonl: corpus path does not exist"):
        check_corpus(load_config(None, [f"corpus.paths=[{tmp_path / 'missing.jsonl'}]"]).corpus)
    (tmp_path / "empty").mkdir()
    jsonl(tmp_path / "empty" / "e.jsonl", "")
    with pytest.raises(DataError, match=r"corpus\.paths=.*all 1 shard file\(s\) are empty"):
        check_corpus(load_config(None, [f"corpus.paths=[{tmp_path / 'empty'}]"]).corpus)
    check_corpus(load_config(None).corpus)  # [] = the shipped sample


def test_corpus_parquet_first_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a paragraph", "another"]}), tmp_path / "ok.parquet")
    assert load_first_record(tmp_path / "ok.parquet") == (1, {"text": "a paragraph"})
    pq.write_table(pa.table({"body": ["a paragraph"]}), tmp_path / "no_text.parquet")
    with pytest.raises(DataError, match=r"corpus\.paths: .*no_text\.parquet: Parquet file has no 'text' column"):
        check_corpus(load_config(None, [f"corpus.paths=[{tmp_path / 'no_text.parquet'}]"]).corpus)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"corpus\.paths: .*junk\.parquet: cannot read Parquet file"):
        check_corpus(load_config(None, [f"corpus.paths=[{tmp_path / 'junk.parquet'}]"]).corpus)


def test_eval_data_is_checked_only_when_evaluating(tmp_path):
    missing = f"eval.data.wiki_span={tmp_path / 'squad.json'}"
    check_eval_data(load_config(None, [missing]).eval)  # eval.interval=0: never read
    with pytest.raises(DataError, match=r"eval\.data\.wiki_span='.*squad\.json': no such file"):
        check_eval_data(load_config(None, [missing, "eval.interval=5"]).eval)


def test_preflight_of_the_quickstart_touches_nothing_heavy():
    preflight(load_config(QUICKSTART, ["output_dir=/nonexistent/out"]))  # smollm2 + shipped sample


def test_only_rank_0_opens_the_corpus(tmp_path, monkeypatch):
    cfg = load_config(None, [f"corpus.paths=[{tmp_path / 'missing.jsonl'}]", f"output_dir={tmp_path}"])
    preflight(cfg, rank=3)
    monkeypatch.setenv("RANK", "1")
    preflight(cfg)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DataError, match=r"corpus\.paths: .*missing\.jsonl"):
        preflight(cfg)


# ------------------------------------------------------------------ Megatron-LM flags
def test_megatron_flags_are_overrides_of_their_keys():
    args = {"flag_policy_load": "/ck/2024", "flag_policy_tokenizer": "null", "flag_optim_lr": "1e-6",
            "flag_train_seed": "7", "flag_output_dir": None}
    assert flag_overrides(args) == ['policy.load="/ck/2024"', 'policy.tokenizer="null"', "train.seed=7",
                                    "optim.lr=1e-6"]
    c = load_config(None, flag_overrides(args))  # a path stays text even when it reads as a number or null
    assert (c.policy.load, c.policy.tokenizer, c.train.seed, c.optim.lr) == ("/ck/2024", "null", 7, 1e-6)
    with pytest.raises(ConfigError, match=r"optim\.lr is set twice, by --lr and by optim\.lr=\.\.\.; keep one"):
        flag_overrides(args, ["train.steps=3", "optim.lr=2e-6"])


# ------------------------------------------------------------------ through `megatron-pz train`
@pytest.fixture
def train_cli(monkeypatch, tmp_path):
    """``megatron-pz train ARGS`` in this process -> (exit status, stderr lines). The console set-up (global
    logging handlers) is skipped, and reaching process-group set-up fails the test: bad input must stop first."""
    from megatron_pz import logs
    from megatron_pz.trainer import setup

    def too_far(*a, **k):
        raise AssertionError("reached process-group set-up: the bad input was not caught before the model")

    monkeypatch.setattr(logs, "configure_console", lambda out, rank: Path(out) / "train.log")
    monkeypatch.setattr(setup, "init_distributed", too_far)

    return lambda *args: cli.main(["train", *args, f"output_dir={tmp_path / 'out'}"])


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("megatron-pz train: error: ")
    return lines[0]


def test_cli_accepts_numbers_as_people_type_them(monkeypatch, tmp_path):
    from megatron_pz import train

    seen = []
    monkeypatch.setattr(train, "train", seen.append)
    monkeypatch.setattr("megatron_pz.logs.configure_console", lambda out, rank: Path(out) / "train.log")
    run = tmp_path / "run.yaml"
    run.write_text(f"base: {QUICKSTART}\noptim:\n  lr: 1e-6\n  min_lr: 5e-7\n  adam_eps: 1E-8\n")
    assert cli.main(["train", "--config", str(run), f"output_dir={tmp_path}"]) == 0
    assert cli.main(["train", "--config", str(run), "optim.lr=2E-6", f"output_dir={tmp_path}", "--seed", "9",
                     "optim.weight_decay=.5"]) == 0  # overrides on both sides of a flag
    assert cli.main(["train", "--config", QUICKSTART, "--lr", "5e-7", f"output_dir={tmp_path}"]) == 0
    (a, b, c) = (s.optim for s in seen)
    assert (a.lr, a.min_lr, a.adam_eps) == (1e-6, 5e-7, 1e-8) and all(isinstance(x, float) for x in (a.lr, a.min_lr))
    assert (b.lr, b.weight_decay, seen[1].train.seed) == (2e-6, 0.5, 9)
    assert c.lr == 5e-7 and isinstance(c.lr, float)


def test_cli_bad_inputs_fail_fast_with_one_line_naming_the_key(train_cli, capsys, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  lr: [1e-6\n")
    megatron_checkpoint(tmp_path / "mlm", tokenizer=False)
    bad_corpus = jsonl(tmp_path / "c.jsonl", "{not json")
    cases = [
        (["--config", str(bad_yaml)],
         (r"bad\.yaml:3:1: not valid YAML: expected ',' or '\]', but got '<stream end>' \(while parsing a flow "
          r"sequence from line 2, column 7\)$")),
        (["--config", QUICKSTART, "optim.lr=fast"],
         r"'optim\.lr' = 'fast' has the wrong type \(expected float, a number such as 5e-7 or 0\.01\)"),
        (["--config", QUICKSTART, "--lr", "1e-6x"], r"'optim\.lr' = '1e-6x' has the wrong type"),
        (["--config", QUICKSTART, "corpus.on_bad_line=maybe"], r"corpus\.on_bad_line='maybe': expected one of"),
        (["--load", str(tmp_path / "missing")], r"policy\.load='.*missing': no such file or directory"),
        (["--load", str(tmp_path / "mlm")], r"without a tokenizer .*set policy\.tokenizer \(--tokenizer\)"),
        (["--load", str(tmp_path / "mlm"), "--tokenizer", str(tmp_path / "tok")],
         r"policy\.tokenizer='.*tok': no such file or directory"),
        (["--config", QUICKSTART, f"corpus.paths=[{bad_corpus}]"], r"corpus\.paths: .*c\.jsonl:1: not valid JSON"),
        (["--config", QUICKSTART, "--lr", "1e-6", "optim.lr=2e-6"], r"optim\.lr is set twice"),
        (["--seed", "3"], r"give a run file \(--config FILE\) or the weights to start from \(--load CKPT"),
    ]
    for args, match in cases:
        assert train_cli(*args) == 2, args
        line = one_error_line(capsys)
        assert re.search(match, line), (args, line)


def test_real_entry_point_in_a_subprocess(tmp_path):
    """``python -m megatron_pz.cli train --load MISSING``: exit status 2, one stderr line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "train", "--load", str(tmp_path / "nope"),
                        "--save", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, check=False)
    assert p.returncode == 2, p.stderr
    want = f"megatron-pz train: error: policy.load='{tmp_path / 'nope'}': no such file or directory"
    assert p.stderr.strip().splitlines() == [want]
