"""A generated study of any size, for memory and speed checks at real model sizes without downloads.

:func:`write_synthetic_study` writes a base checkpoint of a given architecture (transformers' own
seeded initialization, :func:`karcher_lab.io.synthetic.base_state`), ``n`` experts θ_i = θ_0 + s_i ·
std(θ_0) · ε_i with their own seeded standard-normal ε_i (task-vector-like perturbations, s_i growing
from ``strength`` to 3 × ``strength``), written one at a time so that memory holds the base and one
expert, a word-level tokenizer, JSONL tasks of random token prompts and answers (one per expert, named
like it), a probe file, and the study YAML naming them. The models answer nothing meaningful: what such
a study measures is memory and time.

:data:`QWEN2_05B` is a Qwen2-0.5B-shaped config (hidden 896, intermediate 4864, 24 layers, 14 heads and
2 key-value heads, vocabulary 151936, tied embeddings; about 0.49 B parameters) in the Llama architecture
(Qwen2's without its attention biases), so that the generated word-level tokenizer is the one loaded.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
import yaml

from karcher_lab.checks import check_count
from karcher_lab.errors import ParameterError
from karcher_lab.io.output import atomic_directory, check_output_path
from karcher_lab.io.synthetic import base_state, tiny_config, write_checkpoint

QWEN2_05B = tiny_config(
    "llama", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    torch_dtype="bfloat16",
)
"""A Qwen2-0.5B-shaped config (see the module docstring)."""

STUDY_FILE = "study.yml"


def _tokens(vocab_size: int) -> list[str]:
    return [f"t{i}" for i in range(3, vocab_size)]


def _task_lines(rng: random.Random, tokens: list[str], examples: int, prompt_tokens: int, answer_tokens: int) -> str:
    lines = []
    for _ in range(examples):
        prompt = " ".join(rng.choice(tokens) for _ in range(prompt_tokens))
        answer = " " + " ".join(rng.choice(tokens) for _ in range(answer_tokens))
        lines.append(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    return "".join(lines)


def write_synthetic_study(
    folder: str | os.PathLike,
    n: int,
    *,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    tasks: int = 2,
    examples_per_task: int = 16,
    probes: int = 8,
    strength: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write a generated study (see the module docstring) into the new folder ``folder``.

    Parameters
    ----------
    folder : str or path-like
        Must not exist; appears complete or not at all.
    n : int
        Experts (≥ 1), named ``e0 … e{n−1}``.
    config : dict, optional
        The architecture (:func:`karcher_lab.io.synthetic.tiny_config` keys); default a tiny Llama.
    dtype : torch.dtype
        The dtype the checkpoints are stored in.
    tasks : int
        Tasks, owned by the first ``tasks`` experts (≤ n).
    examples_per_task, probes : int
        JSONL examples per task (8 prompt and 2 answer tokens each) and probe lines (16 tokens each).
    strength : float
        The smallest expert's task-vector scale s_0.
    seed : int
        Seed of the base, the task vectors and the data.

    Returns
    -------
    Path
        ``folder/study.yml``.
    """
    check_count("n", n)
    check_count("examples_per_task", examples_per_task)
    check_count("probes", probes)
    check_count("tasks", tasks)
    if tasks > n:
        raise ParameterError(f"tasks ({tasks}) must not exceed the experts ({n})")
    config = dict(config or tiny_config(), torch_dtype=str(dtype).removeprefix("torch."))
    folder = Path(folder).expanduser()
    check_output_path(folder, False, [])
    rng = random.Random(seed)
    tokens = _tokens(config["vocab_size"])
    with atomic_directory(folder) as work:
        base = base_state(config, seed=seed, dtype=dtype)
        write_checkpoint(work / "base", config, base)
        for i in range(n):
            s = strength * (1 + 2 * i / max(n - 1, 1))
            generator = torch.Generator().manual_seed(seed + 1 + i)
            expert = {}
            for name, t in base.items():
                scale = float(t.float().std()) if t.numel() > 1 else 1.0
                noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
                expert[name] = (t.float() + s * (scale or 1.0) * noise).to(dtype)
                del noise
            write_checkpoint(work / "experts" / f"e{i}", config, expert)
            del expert
        (work / "data").mkdir()
        for i in range(tasks):
            (work / "data" / f"e{i}.jsonl").write_text(_task_lines(rng, tokens, examples_per_task, 8, 2), encoding="utf-8")
        (work / "data" / "probes.txt").write_text(
            "".join(" ".join(rng.choice(tokens) for _ in range(16)) + "\n" for _ in range(probes)), encoding="utf-8")
        study = {"name": f"synthetic-{n}", "base": "base", "experts": {f"e{i}": f"experts/e{i}" for i in range(n)},
                 "tasks": {f"e{i}": f"data/e{i}.jsonl" for i in range(tasks)}, "probes": "data/probes.txt"}
        (work / STUDY_FILE).write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return folder / STUDY_FILE
