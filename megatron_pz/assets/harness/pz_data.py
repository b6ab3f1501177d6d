"""The data of the tasks in this folder, read from the JSONL files beside it (no download, any working directory).

lm-evaluation-harness calls ``load(**metadata, **dataset_kwargs)`` for a task whose YAML says
``custom_dataset: !function pz_data.load``; ``file`` names the JSONL (default: the task's own).
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file: str = "pz_wiki_lastword.jsonl", **_: object):
    import datasets

    with open(HERE / file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
