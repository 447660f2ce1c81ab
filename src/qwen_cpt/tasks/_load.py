"""lm-eval's ``custom_dataset`` for the YAMLs of this folder: their ``.jsonl`` file, found next to
this file, as the ``test`` split (so the tasks need no absolute path and no network)."""

import json
from pathlib import Path


def load(file: str, **_):
    import datasets

    lines = Path(__file__).with_name(file).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
