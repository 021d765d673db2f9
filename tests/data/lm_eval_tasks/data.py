"""The zoo's ``units`` task (24 held-out examples, seed 0) as an lm-eval dataset, read from units.jsonl
next to this file: ``prompt``, ``answer``, four ``choices`` (the answer and three other examples'
answers) and the ``gold`` choice's index."""
from pathlib import Path

import datasets

FILE = Path(__file__).with_name("units.jsonl")


def units(**kwargs):
    """lm-eval's ``custom_dataset`` hook: the examples as the ``test`` split."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(FILE))})
