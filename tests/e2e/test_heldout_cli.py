"""``megatron-pz heldout`` end to end on the tiny policy (in process, through ``megatron_pz.cli.main``): it refuses
unchanged weights, and scores moved ones."""
import json
import shutil

from megatron_pz.cli import main

TEXTS = ["Paris is the capital and most populous city of France, with an estimated population of two million.",
         "The river Seine flows through the city. Its banks are listed as a World Heritage Site since 1991.",
         "Marble was quarried on the island for the temples of the Greek world, and shipped across the sea.",
         "In the anti-war movement of the 1960s, students organised teach-ins at many universities.",
         "The cathedral (completed in 1345) is among the finest examples of French Gothic architecture."]


def write_rows(path):
    path.write_text("".join(json.dumps({"id": f"enwiki-{7 + i // 2}-{i % 2:03d}", "title": f"T{i // 2}", "text": t})
                            + "\n" for i, t in enumerate(TEXTS)))
    return path


def cli(capsys, *args):
    rc = main(["heldout", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_refuses_unchanged_weights(tiny_policy, tmp_path, capsys):
    data = write_rows(tmp_path / "p.jsonl")
    rc, out, err = cli(capsys, "--load", tiny_policy, "--reference", tiny_policy, "--data", data,
               "--out", tmp_path / "h.json")
    assert rc == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("megatron-pz heldout: error:") and "max|dw| = 0" in last and "--allow-unchanged" in last
    assert "max|dw| = 0 against --reference" in out and not (tmp_path / "h.json").exists()


def test_scores_moved_weights(tiny_policy, tmp_path, capsys, one_thread):
    import torch
    from safetensors.torch import load_file, save_file

    moved = tmp_path / "moved"
    shutil.copytree(tiny_policy, moved)
    weights = load_file(str(moved / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + 0.25 * torch.eye(*weights[name].shape)
    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "h.json"
    data = write_rows(tmp_path / "p.jsonl")
    rc, stdout, err = cli(capsys, "--load", moved, "--reference", tiny_policy, "--data", data,
               "--items", 4, "--batch-size", 3, "--out", out)
    assert rc == 0, err[-3000:]
    assert "an HF folder (no iteration); max|dw| = 0.25 against" in stdout
    doc = json.loads(out.read_text())
    assert doc["max_abs_dw"] == 0.25 and doc["iteration"] is None and doc["layout"]["reward"] == "continuation_match"
    assert doc["summary"]["n"] == 4 == len(doc["records"])
    r = doc["records"][0]
    assert {"key", "article", "paragraph", "span", "p", "log_p", "greedy", "exact", "nll", "tokens"} <= r.keys()
    assert 0 < r["p"] < 1 and r["tokens"] > 0 and r["exact"] in (0.0, 1.0)
