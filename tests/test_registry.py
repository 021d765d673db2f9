"""The registry's contract: a method registered with its rules is usable by every caller without any
of them knowing its name, and a function whose signature disagrees with its declaration is refused."""
from __future__ import annotations

import pytest
import torch

import karcher_lab
from karcher_lab.errors import MissingBaseError, ModelCountError
from karcher_lab.methods import registry
from karcher_lab.methods.registry import MergeMethod, Param, register


@pytest.fixture()
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry.METHODS, "entries", dict(registry.METHODS.entries))


def test_a_new_method_works_in_merge_tensors_and_whole_model_merges(scratch_registry):
    @register("scaled_mean", summary="base + scale · weighted mean of the task vectors",
              params=(Param("scale", float, 1.0, low=0.0),), base="required", min_models=1)
    def scaled_mean(tensors, *, weights, base, scale):
        deltas = [t - base for t in tensors]
        return base + scale * sum(w * d for w, d in zip(weights.tolist(), deltas)) / float(weights.sum())

    base = {"w": torch.zeros(2, 3), "b": torch.ones(3)}
    experts = [{k: v + i + 1 for k, v in base.items()} for i in range(2)]
    out = karcher_lab.merge(experts, "scaled_mean", base=base, weights=[1.0, 3.0], params={"scale": 0.5})
    for name in base:  # 0.5 · (1·1 + 3·2)/4 = 0.875 above the base
        torch.testing.assert_close(out[name], base[name] + 0.875, rtol=0, atol=1e-7)
    with pytest.raises(MissingBaseError):
        karcher_lab.merge(experts, "scaled_mean")
    spec = karcher_lab.get_method("scaled_mean")
    assert spec.uses_base() and not spec.pair and not spec.reweightable
    assert spec.context == ("weights", "base")


def test_a_signature_that_disagrees_with_the_declaration_is_refused(scratch_registry):
    def takes_alpha(tensors, *, alpha):
        return tensors[0]

    with pytest.raises(ValueError, match=r"\['alpha'\] differ from the declared parameters \['beta'\]"):
        registry.add_method(MergeMethod("bad", takes_alpha, "x", params=(Param("beta", float, 1.0),)))
    with pytest.raises(ValueError, match="registered twice"):
        registry.add_method(MergeMethod("linear", takes_alpha, "x", params=(Param("alpha", float, 1.0),)))
    with pytest.raises(ValueError, match="must name a bool parameter"):
        registry.add_method(MergeMethod("bad", takes_alpha, "x", params=(Param("alpha", float, 1.0),), base="optional",
                                        base_mode="alpha"))


@pytest.mark.parametrize("name, pair, reweightable", [
    ("slerp", True, False), ("arcee_fusion", True, False), ("nearswap", True, False),
    ("karcher", False, True), ("linear", False, False), ("ties", False, False), ("passthrough", False, False),
])
def test_method_rules_are_read_from_the_method(name, pair, reweightable):
    spec = karcher_lab.get_method(name)
    assert (spec.pair, spec.reweightable) == (pair, reweightable)


def test_karcher_uses_a_base_only_in_task_vector_mode():
    spec = karcher_lab.get_method("karcher")
    assert not spec.uses_base() and not spec.uses_base({"task_vectors": False})
    assert spec.uses_base({"task_vectors": True}) and spec.uses_base({"task_vectors": "true"})
    with pytest.raises(ModelCountError, match="karcher merges at least 1 models, got 0"):
        spec.check_count(0)
