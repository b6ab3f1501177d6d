"""logging.wandb: the run's scalars reach a Weights & Biases run, read back from the offline run file.

W&B runs offline here (``WANDB_MODE=offline``, every W&B folder in tmp): no network. The offline run is a
``run-<id>.wandb`` file, a LevelDB-style record log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each
with a 7-byte header: CRC, little-endian length, type 1 = full / 2 first / 3 middle / 4 last) of the
``wandb_internal_pb2.Record`` protobufs that ``wandb sync`` uploads; the history records hold the logged rows.
"""
import json
import struct
import time
from pathlib import Path

import pytest

from megatron_pz.config import load_config
from megatron_pz.errors import ConfigError
from megatron_pz.logs import RunLogger
from megatron_pz.trainer.preflight import check_wandb

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for var, sub in (("WANDB_DIR", "wb"), ("WANDB_CONFIG_DIR", "wb_config"), ("WANDB_CACHE_DIR", "wb_cache"),
                     ("WANDB_DATA_DIR", "wb_data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wb"


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, chunk, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if pos + 7 + length > len(data):  # a record still being written
            return
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece of a record split over blocks
            yield chunk
            chunk = b""


def _history(run_file: Path, wait_s: float = 60.0) -> list[dict]:
    """The logged rows, once the run's closing ``exit`` record is in the file: W&B's service process writes the
    file on its own and may still be at it when ``finish()`` has returned."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        rows, closed = [], False
        for data in _records(run_file):
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            closed |= kind == "exit"
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
        if closed or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_scalars_land_in_the_offline_run_and_a_resume_continues_it(tmp_path, offline):
    out = tmp_path / "run"
    settings = {"project": "mpz-test", "name": "tiny", "mode": None, "config": {"loss": {"mismatch": "tis"}}}
    log = RunLogger(out, total_steps=3, tensorboard=False, progress_bar=False, wandb=settings)
    log.log_step(1, {"reward/mask_pred": 0.25, "train/loss": -1.5, "nan": float("nan")})
    log.log_step(2, {"reward/mask_pred": 0.5, "train/loss": -0.5})
    log.close()
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    [first] = list((offline / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    rows = _history(first)
    assert [(r["_step"], r["reward/mask_pred"], r["train/loss"]) for r in rows] == [(1, 0.25, -1.5), (2, 0.5, -0.5)]
    assert "nan" not in rows[0]  # non-finite values are not sent (metrics.jsonl writes them as null)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # the same output folder resumed: the same W&B run id, a new offline segment with the new steps
    log = RunLogger(out, total_steps=3, start_step=3, steps_done=2, tensorboard=False, progress_bar=False,
                    wandb=settings)
    log.log_step(3, {"reward/mask_pred": 0.75})
    log.close()
    runs = sorted((offline / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    second = [p for p in runs if p != first]
    assert len(runs) == 2 and [(r["_step"], r["reward/mask_pred"]) for r in _history(second[0])] == [(3, 0.75)]


def test_off_by_default_and_mode_is_checked():
    c = load_config(None)
    assert c.logging.wandb is False and c.logging.wandb_mode is None
    assert load_config(None, ["logging.wandb=true", "logging.wandb_mode=offline"]).logging.wandb_mode == "offline"
    with pytest.raises(ConfigError, match=r"logging\.wandb_mode must be online, offline or null, got 'dry'"):
        load_config(None, ["logging.wandb_mode=dry"])


def test_preflight_names_the_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.wandb=true needs the wandb package"):
        check_wandb(True)
    check_wandb(False)
