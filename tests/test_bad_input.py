"""Bad input gets a specific karcher_lab.errors exception before any work, never a silent NaN."""
from __future__ import annotations

import pytest
import torch

from karcher_lab import errors, list_methods, merge_tensors
from karcher_lab.methods import get_method


def _models(n=3, shape=(4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.fixture
def spied_linear():
    entry = get_method("linear")
    original = entry.fn
    calls: list[int] = []
    object.__setattr__(entry, "fn", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    yield calls
    object.__setattr__(entry, "fn", original)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(errors.UnknownMethodError, match="karcher"):
        merge_tensors("karcher_typo", _models())


def test_empty_list(spied_linear):
    with pytest.raises(errors.EmptyInputError, match="empty"):
        merge_tensors("linear", [])
    assert spied_linear == []


def test_mismatched_shapes_name_the_tensor_and_model(spied_linear):
    models = _models() + [torch.zeros(5, 4)]
    with pytest.raises(errors.ShapeMismatchError, match=r"'layers.0.w'.*model 3.*\(5, 4\)"):
        merge_tensors("linear", models, name="layers.0.w")
    assert spied_linear == []


def test_base_of_another_shape():
    with pytest.raises(errors.ShapeMismatchError, match="base"):
        merge_tensors("task_arithmetic", _models(), base=torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs(spied_linear, bad):
    models = _models()
    models[1][2, 3] = bad
    with pytest.raises(errors.NonFiniteError, match="model 1"):
        merge_tensors("linear", models)
    assert spied_linear == []


def test_non_finite_base():
    base = torch.zeros(4, 5)
    base[0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="base contains 1 NaN"):
        merge_tensors("task_arithmetic", _models(), base=base)


def test_weights_of_the_wrong_length(spied_linear):
    with pytest.raises(errors.WeightError, match="2 weights for 3 models"):
        merge_tensors("linear", _models(), weights=[0.5, 0.5])
    assert spied_linear == []


def test_all_zero_weights():
    with pytest.raises(errors.WeightError, match="all weights are zero"):
        merge_tensors("karcher", _models(), weights=[0.0, 0.0, 0.0])


@pytest.mark.parametrize("method", ["karcher", "multislerp"])
def test_negative_weights_rejected_where_the_method_needs_non_negative_ones(method):
    models = _models(2)
    with pytest.raises(errors.WeightError, match="non-negative"):
        merge_tensors(method, models, weights=[1.0, -0.5])


def test_negative_weights_allowed_in_task_arithmetic():
    models, base = _models(2), torch.zeros(4, 5)
    out = merge_tensors("task_arithmetic", models, base=base, weights=[1.0, -0.5])
    torch.testing.assert_close(out, models[0] - 0.5 * models[1])


def test_non_finite_weights():
    with pytest.raises(errors.WeightError, match="finite"):
        merge_tensors("linear", _models(), weights=[1.0, float("nan"), 1.0])


def test_unknown_parameter_is_named():
    with pytest.raises(errors.ParameterError, match="unknown parameter.*'densty'"):
        merge_tensors("ties", _models(), base=torch.zeros(4, 5), densty=0.5)


def test_required_parameter_missing():
    with pytest.raises(errors.ParameterError, match="'t' is required"):
        merge_tensors("slerp", _models(2))


def test_parameter_of_the_wrong_type():
    with pytest.raises(errors.ParameterError, match="max_iter.*int"):
        merge_tensors("karcher", _models(), max_iter=2.5)


def test_per_model_parameter_of_the_wrong_length():
    with pytest.raises(errors.ParameterError, match="2 values for 3 models"):
        merge_tensors("ties", _models(), base=torch.zeros(4, 5), density=[0.5, 0.5])


def test_model_count():
    with pytest.raises(errors.ModelCountError, match="exactly 2"):
        merge_tensors("slerp", _models(3), t=0.5)


def test_missing_base():
    with pytest.raises(errors.MissingBaseError, match="ties needs a base"):
        merge_tensors("ties", _models())


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.5, float("nan")])
def test_karcher_step_size_outside_0_1(eta):
    with pytest.raises(errors.ParameterError):
        merge_tensors("karcher", _models(), eta=eta)


def test_non_float_tensor():
    with pytest.raises(errors.InputError, match="floating-point"):
        merge_tensors("linear", [torch.ones(3, dtype=torch.int64)] * 2)


def test_every_registered_method_rejects_nan_before_work():
    for method in list_methods():
        entry = get_method(method)
        n = max(entry.min_models, 2) if entry.max_models is None else entry.max_models
        models = _models(n)
        models[0][0, 0] = float("nan")
        with pytest.raises(errors.NonFiniteError):
            merge_tensors(method, models, base=torch.zeros(4, 5))


def test_errors_are_value_errors_for_generic_handlers():
    assert issubclass(errors.ShapeMismatchError, ValueError)
    assert issubclass(errors.WeightError, ValueError)
    assert issubclass(errors.StepSizeError, errors.ParameterError)


def test_large_finite_values_whose_sum_overflows_are_accepted():
    models = [torch.full((10,), 1e38), torch.full((10,), 1e38)]  # each sum is 1e39 > float32 max
    out = merge_tensors("linear", models)
    assert bool(torch.isfinite(out).all()) and float(out[0]) == pytest.approx(1e38, rel=1e-6)
