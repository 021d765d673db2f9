"""Natural-text tasks: finish a word of real text (Python standard-library code, King James prose).

The text ships in ``data/text/`` (provenance and licences in ``data/README.md``). An example takes a
line of its split, cuts a word of at least four characters after its first two or more characters,
and asks for the rest of the word: the prompt is ``<tag>:`` plus up to ``CONTEXT_CHARS`` characters of
the line before the cut, the answer is the remainder of the word. Lines, not prompts, are split
between train and eval (by a hash of the line), so no eval context was seen in training; prompts are
split by their hash too, so that a short context common to both (``"    def "``) stays on one side.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path

from karcher_lab.diagnostics.examples import Example
from karcher_lab.errors import NotSupportedError
from karcher_lab.zoo.tasks import Task, split_of

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "text"
CONTEXT_CHARS = 16
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{3,}")


@lru_cache(maxsize=None)
def _split_lines(path: Path) -> dict[str, tuple[str, ...]]:
    if not path.is_file():
        raise NotSupportedError(f"text data {path} is missing: the zoo needs the repository's data/ folder")
    lines = [ln for ln in path.read_text().splitlines() if WORD.search(ln) and not ln.startswith("# ---- ")]
    return {split: tuple(ln for ln in lines if split_of(ln) == split) for split in ("train", "eval")}


class TextCompletion(Task):
    """Complete the current word of a line of real text."""

    domain = "text"

    def __init__(self, name: str, tag: str, filename: str, description: str):
        self.name, self.tag, self.filename, self.description = name, tag, filename, description

    def draw(self, rng: random.Random, split: str) -> Example | None:
        line = rng.choice(_split_lines(DATA_DIR / self.filename)[split])
        word = rng.choice(list(WORD.finditer(line)))
        cut = word.start() + rng.randint(2, len(word.group()) - 1)
        prompt = f"{self.tag}:{line[max(0, cut - CONTEXT_CHARS):cut]}"
        return Example(prompt, line[cut:word.end()]) if split_of(prompt) == split else None


TEXT_TASKS = (
    TextCompletion("code", "py", "python_stdlib.txt", "finish an identifier in Python standard-library source"),
    TextCompletion("prose", "txt", "kjv_genesis.txt", "finish a word of the King James Genesis"),
)
