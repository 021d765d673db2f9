"""A Study over real SmolLM2-135M-Instruct and two cheap derived experts (the base plus a small seeded
task vector), scored with its chat template and greedy exact match (CI fetches SmolLM2; skipped without)."""
from __future__ import annotations

import pytest

from conftest import needs_smollm2
from karcher_lab import load_study
from karcher_lab.measurement import MeasurementSettings
from karcher_lab.measurement.studies import engine_for_study
from karcher_lab.methods import merge_tensors

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def study(smollm2_study_file):
    return load_study(smollm2_study_file)


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
