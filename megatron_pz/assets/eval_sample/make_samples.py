"""Rebuild the shipped evaluation samples from the team's benchmark copies (see README.md in this folder).

    python megatron_pz/assets/eval_sample/make_samples.py /work/shared/data

Deterministic: each sample is ``random.Random(0).sample`` of the record indices, kept in source order. Fields not
used by the loaders (worked solutions, URLs) are dropped to keep the package small.
"""
import hashlib
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
PLAN = {  # name: (source relative to data root, sample size, fields kept)
    "gsm8k": ("eval/gsm8k/test.jsonl", 200, ("question", "answer")),
    "math500": ("eval/math500/test.jsonl", 200, ("unique_id", "problem", "answer", "subject", "level")),
    "olympiadbench": ("eval/olympiadbench/test.jsonl", 150,
                      ("id", "question", "final_answer", "is_multiple_answer", "unit", "answer_type")),
    "mmlu": ("eval/mmlu/test.jsonl", 200, ("subject", "question", "choices", "answer")),
    "mmlu_pro": ("eval/mmlu_pro/test.jsonl", 200, ("question_id", "question", "options", "answer", "category")),
    "supergpqa": ("eval/supergpqa_sample300/test.jsonl", 100, ("question", "answer")),
}


def sample_indices(n: int, k: int) -> list[int]:
    return sorted(random.Random(0).sample(range(n), min(k, n)))


def main(root: str) -> None:
    root_p = Path(root)
    manifest = {}
    for name, (rel, k, keep) in PLAN.items():
        src = root_p / rel
        rows = [json.loads(line) for line in src.read_text(encoding="utf-8").split("\n") if line.strip()]
        chosen = [{f: rows[i][f] for f in keep if f in rows[i]} for i in sample_indices(len(rows), k)]
        dst = OUT / f"{name}.jsonl"
        dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
        manifest[dst.name] = {"source": rel, "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                              "source_rows": len(rows), "rows": len(chosen)}
    # SQuAD v1.1 dev: 200 questions (random, seed 0) kept in SQuAD's own JSON layout, one paragraph per question.
    src = root_p / "squad/dev-v1.1.json"
    doc = json.loads(src.read_text(encoding="utf-8"))
    flat = [(a["title"], p["context"], qa) for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]]
    picked = [flat[i] for i in sample_indices(len(flat), 200)]
    articles: dict[str, list] = {}
    for title, context, qa in picked:
        paras = articles.setdefault(title, [])
        if paras and paras[-1]["context"] == context:
            paras[-1]["qas"].append({"id": qa["id"], "question": qa["question"], "answers": qa["answers"][:1]})
        else:
            paras.append({"context": context,
                          "qas": [{"id": qa["id"], "question": qa["question"], "answers": qa["answers"][:1]}]})
    out = {"version": "1.1", "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}
    (OUT / "squad_span.json").write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    manifest["squad_span.json"] = {"source": "squad/dev-v1.1.json",
                                   "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                                   "source_rows": len(flat), "rows": len(picked)}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
