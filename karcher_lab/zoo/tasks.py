"""Tasks of the expert zoo: seeded generators of :class:`~karcher_lab.diagnostics.examples.Example`
(prompt, answer) pairs, with disjoint train and eval splits.

Every task writes its examples in one format, ``"<tag>:<input>="`` for the prompt and the expected
string for the answer (text-domain tasks drop the ``=``: their prompt is a context to continue). A
model is scored by **exact match** (its greedy continuation of the prompt, up to end-of-sequence,
equals the answer) and by the **NLL** of the answer given the prompt (nats per answer token, the
end-of-sequence token included).

Disjoint splits by construction: an example belongs to the eval split iff a hash of its *prompt*
falls in the eval fifth, so no seed can put one prompt in both splits (text tasks also split their
source lines, corpus.py). Generation is a pure function of (task, split, n, seed).
"""
from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod

from karcher_lab.diagnostics.examples import Example
from karcher_lab.errors import ParameterError

SPLITS = ("train", "eval")
EVAL_FRACTION_DENOMINATOR = 5  # one key in five goes to eval


def split_of(key: str) -> str:
    """The split a prompt (or source line) belongs to: a stable hash, independent of any seed."""
    digest = hashlib.sha256(key.encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "little") % EVAL_FRACTION_DENOMINATOR == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ParameterError(f"split must be one of {SPLITS}, got {split!r}")


def _rng(name: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{name}/{split}/{seed}")


class Task(ABC):
    """A task: a name, a prompt tag, and a seeded example generator with disjoint splits."""

    name: str
    tag: str
    description: str
    domain: str  # "synthetic" or "text"
    max_draws_per_example = 50  # small input spaces: stop drawing once the split is exhausted

    @abstractmethod
    def draw(self, rng: random.Random, split: str) -> Example | None:
        """One random example, or None when the draw fell in the other split."""

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split``; eval prompts are distinct (fewer if the split is smaller)."""
        _check_split(split)
        rng = _rng(self.name, split, seed)
        out: list[Example] = []
        seen: set[str] = set()
        for _ in range(self.max_draws_per_example * n):
            if len(out) == n:
                break
            example = self.draw(rng, split)
            if example is None or (split == "eval" and example.prompt in seen):
                continue
            seen.add(example.prompt)
            out.append(example)
        return out

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.description}>"


class SyntheticTask(Task):
    """A task ``answer = solve(input)`` on inputs drawn by ``random_input(rng)``; the prompt is ``tag:input=``."""

    domain = "synthetic"

    @abstractmethod
    def random_input(self, rng: random.Random) -> str:
        """Draw one input."""

    @abstractmethod
    def solve(self, text: str) -> str:
        """The correct answer for ``text``."""

    def draw(self, rng: random.Random, split: str) -> Example | None:
        text = self.random_input(rng)
        prompt = f"{self.tag}:{text}="
        return Example(prompt, self.solve(text)) if split_of(prompt) == split else None
