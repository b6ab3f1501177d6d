"""Learning-curve table and plot (docs/results.md) from hand-written metrics lines."""
import json

import pytest

from megatron_pz.errors import DataError
from megatron_pz.eval.curves import eval_table, load_metrics, moving_average, plot_runs, series


def _write(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_resumed_step_keeps_the_last_line_and_rows_are_sorted(tmp_path):
    d = _write(tmp_path, "a", [{"step": 2, "x": 1.0}, {"step": 1, "x": 5.0}, {"step": 2, "x": 3.0, "y": 0.5}])
    rows = load_metrics(d)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["x"] == 3.0 and rows[1]["y"] == 0.5
    assert series(rows, "y") == ([2], [0.5])


def test_bad_metrics_are_named(tmp_path):
    with pytest.raises(DataError, match="no metrics file"):
        load_metrics(tmp_path)
    d = _write(tmp_path, "b", [{"step": 1}])
    (d / "metrics.jsonl").write_text('{"step": 1}\n{"nostep": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        load_metrics(d)


def test_eval_table_lists_eval_points_only():
    runs = {"pz": [{"step": 0, "eval/wiki_span/accuracy": 0.125}, {"step": 1, "acc/mask_pred": 0.3},
                   {"step": 8, "eval/wiki_span/accuracy": 0.25}],
            "rs": [{"step": 8, "eval/wiki_span/accuracy": 0.0625}]}
    lines = eval_table(runs).splitlines()
    assert lines[0] == "| run | step | wiki_span acc |"
    assert lines[2:] == ["| pz | 0 | 12.5 % |", "| pz | 8 | 25.0 % |", "| rs | 8 | 6.2 % |"]


def test_moving_average_hand_computed():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([], 3) == []


def test_plot_writes_a_png(tmp_path):
    rows = [{"step": s, "eval/wiki_span/accuracy": 0.1 * s, "acc/mask_pred": 0.2, "mask/valid_rate": 0.3}
            for s in range(3)]
    png = plot_runs({"pz": rows}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
