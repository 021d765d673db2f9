"""Conformance with the peer, mergekit 0.1.5, on golden fixtures written by tools/make_golden.py.

Each case in tests/golden/<method>.safetensors is mergekit's own output (its ``merge_tensors`` entry
point, parameters in its YAML names) on a small seeded input set from tests/golden/inputs.safetensors.
Here the same case runs through :func:`karcher_lab.merge_tensors` with mergekit's semantics mapped to
our API: per-model ``weight`` → ``weights=``; per-model parameters (density, gamma, epsilon) → lists;
slerp's ``base_model`` (the t = 0 end) → the first of the two tensors; karcher with mergekit's fixed
settings (equal weights, η = 1, max_iter 10, tol 1e-5, one block per tensor); randomized methods with
``seed=`` the seed mergekit ran under (``torch.manual_seed``), since our generator draws the same
masks from the same stream.

Tolerances, relative to the case's scale S = the largest |entry| among its inputs and mergekit's output:

* float32 inputs: |ours − mergekit| ≤ 1e-6·S everywhere (≈ 8 float32 ulps at S: float rounding,
  different operation orders). Random methods must reproduce mergekit's masks, so the same bound holds.
* bfloat16 inputs, where mergekit computes in bf16 (it rounds every intermediate: deltas, weighted
  sums, unit vectors, every Karcher iterate) and we compute in float32. Two checks:
  1. the fixture's ``output_f32`` (mergekit on the same bf16 inputs with ``dtype=float32``) against
     ours with ``out_dtype=float32``: the float32 bound above. This isolates semantics from precision.
  2. mergekit's native bf16 output against ours in bf16: |ours − mergekit| ≤ 2⁻⁶·S (= 4 bf16 ulps at S).
     mergekit's own bf16-vs-float32 spread on these fixtures is at most 8.4e-3·S (karcher, whose ten
     iterations each round to bf16), so the bound has about 2× margin. Where the method makes discrete
     choices from bf16-rounded scores (random masks, whose keep probability mergekit rounds to bf16,
     e.g. 0.3 → 0.30078; DELLA ranks; SCE's variance top-k; arcee_fusion's threshold) a few entries
     flip: at most 1% of the entries may exceed the bound (observed: ≤ 0.26%).

Documented deviations (case field ``deviation``) are asserted as differences: what mergekit gives,
what we give instead. See the docstrings of the methods for the reasoning.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from karcher_lab import errors, merge_tensors

GOLDEN = Path(__file__).parent / "golden"
F32_RTOL = 1e-6
BF16_RTOL = 2.0**-6
BF16_FLIP_FRACTION = 0.01
DISCRETE_CHOICE_METHODS = {"dare_linear", "dare_ties", "della", "della_linear", "arcee_fusion", "sce"}
KARCHER_AS_MERGEKIT = {"eta": 1.0, "block": "tensor"}


def _load_cases() -> list[dict]:
    cases = []
    for path in sorted(GOLDEN.glob("*.safetensors")):
        if path.name == "inputs.safetensors":
            continue
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["golden"])
            for case in meta["cases"]:
                case["outputs"] = {
                    key.split("/", 1)[1]: f.get_tensor(key) for key in f.keys() if key.startswith(case["id"] + "/")
                }
                cases.append(case)
    return cases


@lru_cache(maxsize=None)
def _input_set(name: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    with safe_open(str(GOLDEN / "inputs.safetensors"), "pt") as f:
        models = tuple(f.get_tensor(k) for k in sorted(key for key in f.keys() if key.startswith(name + "/model")))
        return f.get_tensor(name + "/base"), models


CASES = _load_cases()


def _inputs(case: dict) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    base, models = _input_set(case["inputs"])
    return (base if case["base"] else None), list(models[: case["n_models"]])


def _ours(case: dict, *, out_dtype: torch.dtype | None = None, **overrides) -> torch.Tensor:
    """karcher_lab's result for a case, mergekit's parameters mapped to our API (module docstring)."""
    base, models = _inputs(case)
    params = dict(case["params"])
    weights = params.pop("weight", None)
    method = case["method"]
    if method == "slerp":
        models, base = [base, *models], None
    if method == "karcher":
        params.update(KARCHER_AS_MERGEKIT)
    kwargs = dict(weights=weights, base=base, seed=case["seed"], out_dtype=out_dtype, **params)
    kwargs.update(overrides)
    return merge_tensors(method, models, **kwargs)


def _scale(case: dict) -> float:
    base, models = _inputs(case)
    tensors = models + ([base] if base is not None else [])
    if "output" in case["outputs"]:
        tensors.append(case["outputs"]["output"])
    return max(float(t.float()[torch.isfinite(t.float())].abs().max()) for t in tensors)


def _relative_errors(ours: torch.Tensor, golden: torch.Tensor, scale: float) -> torch.Tensor:
    assert ours.shape == golden.shape
    return (ours.double() - golden.double()).abs() / scale


def _case_id(case: dict) -> str:
    return f"{case['id']}-{case['dtype']}-{'x'.join(map(str, case['outputs'].get('output', torch.empty(0)).shape))}"


CONFORMING = [c for c in CASES if c["deviation"] is None]
DEVIATING = {c["deviation"] for c in CASES if c["deviation"] is not None}


def test_fixtures_are_present_and_small():
    """Every method we share with mergekit has fixtures, N = 2, 3, 5 appear, and they stay under 2 MB."""
    methods = {c["method"] for c in CASES}
    assert methods >= {
        "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
        "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce", "model_stock",
        "arcee_fusion", "nearswap", "ram", "ramplus_tl",
    }
    assert {c["n_models"] for c in CASES} >= {1, 2, 3, 5}
    assert {c["dtype"] for c in CASES} == {"f32", "bf16"}
    assert sum(p.stat().st_size for p in GOLDEN.glob("*.safetensors")) < 2_000_000
    assert all(("output" in c["outputs"]) != ("mergekit_error" in c) for c in CASES)


@pytest.mark.parametrize("case", CONFORMING, ids=_case_id)
def test_matches_mergekit(case):
    scale = _scale(case)
    if case["dtype"] == "f32":
        err = _relative_errors(_ours(case), case["outputs"]["output"], scale)
        assert float(err.max()) <= F32_RTOL, f"{case['id']}: max |ours − mergekit| / S = {float(err.max()):.3g}"
        return
    # bf16: semantics in float32 against mergekit's float32 compute, then the native bf16 result
    err32 = _relative_errors(_ours(case, out_dtype=torch.float32), case["outputs"]["output_f32"], scale)
    assert float(err32.max()) <= F32_RTOL, (
        f"{case['id']}: float32 compute, max |ours − mergekit| / S = {float(err32.max()):.3g}"
    )
    ours = _ours(case)
    assert ours.dtype == torch.bfloat16
    err = _relative_errors(ours, case["outputs"]["output"], scale)
    beyond = float((err > BF16_RTOL).double().mean())
    allowed = BF16_FLIP_FRACTION if case["method"] in DISCRETE_CHOICE_METHODS else 0.0
    assert beyond <= allowed, (
        f"{case['id']}: bf16, {beyond:.2%} of entries beyond 2^-6·S (max {float(err.max()):.3g}), allowed {allowed:.0%}"
    )


# ------------------------------------------------------------------------------------------------
# Randomized trims: distribution checks that do not depend on reproducing mergekit's stream.

RANDOM_SINGLE = [
    c for c in CONFORMING if c["method"] in {"dare_linear", "dare_ties", "della", "della_linear"} and c["n_models"] == 1
]


def _trim_statistics(case: dict, merged: torch.Tensor) -> dict:
    """From a one-model merge θ0 + w·δ̃: the keep mask, and max |δ̃ − s·δ| / S on it, s the L1 factor."""
    base, (model,) = _inputs(case)
    delta = model.double() - base.double()
    change = (merged.double() - base.double()) / case["params"]["weight"][0]
    kept = change != 0
    s = float(delta.abs().sum() / delta[kept].abs().sum())
    misfit = float((change[kept] - s * delta[kept]).abs().max()) / _scale(case)
    return {"kept": kept, "misfit": misfit}


@pytest.mark.parametrize("case", RANDOM_SINGLE, ids=_case_id)
def test_random_trim_statistics(case):
    """Keep rate within 4 binomial σ of ρ (DELLA: ρ ∓ ε/2 in the lower/upper magnitude half of each row),
    kept entries equal to δ times the L1 factor ‖δ‖₁/‖m⊙δ‖₁, for mergekit's draw and for two of ours;
    different seeds give different masks."""
    base, (model,) = _inputs(case)
    delta = (model.double() - base.double())
    rho = case["params"]["density"]
    tol = BF16_RTOL if case["dtype"] == "bf16" else F32_RTOL
    draws = {
        "mergekit": case["outputs"]["output"],
        "ours": _ours(case),
        "ours, next seed": _ours(case, seed=case["seed"] + 1),
    }
    masks = {}
    for label, merged in draws.items():
        stats = _trim_statistics(case, merged)
        kept = stats["kept"]
        masks[label] = kept
        assert stats["misfit"] <= tol, f"{label}: kept entries are not s·δ (misfit {stats['misfit']:.3g})"
        if case["method"].startswith("dare"):
            groups = [(kept, rho)]
        else:  # DELLA: keep probability grows linearly with the magnitude rank along dim 1
            eps = case["params"]["epsilon"]
            rank = delta.abs().argsort(dim=1).argsort(dim=1)
            lower = rank < delta.shape[1] // 2
            groups = [(kept[lower], rho - eps / 2), (kept[~lower], rho + eps / 2)]
        for group, p in groups:
            sigma = math.sqrt(p * (1 - p) / group.numel())
            rate = float(group.double().mean())
            assert abs(rate - p) <= 4 * sigma, f"{label}: keep rate {rate:.4f}, expected {p:.4f} ± {4 * sigma:.4f}"
    assert not torch.equal(masks["ours"], masks["ours, next seed"])


# ------------------------------------------------------------------------------------------------
# Documented deviations: assert what mergekit does and what we do instead.

def _deviating(name: str) -> list[dict]:
    found = [c for c in CASES if c["deviation"] == name]
    assert found, f"no fixture exercises the deviation {name!r}"
    return found


def test_every_deviation_fixture_is_checked():
    checked = {
        "linear_cancelling_weights", "slerp_zero_tensor", "nuslerp_zero_task_vector", "nuslerp_tiny_weight_sum",
        "multislerp_zero_task_vectors", "multislerp_antipodal_pair", "model_stock_negative_cosine", "ramplus_no_unique_entries",
        "della_single_entry_rows", "karcher_zero_model_norm", "karcher_antipodal",
    }
    assert DEVIATING == checked


def test_linear_cancelling_weights_raise_instead_of_dividing_by_zero():
    (case,) = _deviating("linear_cancelling_weights")
    assert not bool(torch.isfinite(case["outputs"]["output"]).all())  # mergekit: x / 0
    with pytest.raises(errors.WeightError):
        _ours(case)


def test_slerp_with_a_zero_tensor_interpolates_linearly():
    (case,) = _deviating("slerp_zero_tensor")
    base, (model,) = _inputs(case)
    t = case["params"]["t"]
    assert float(base.abs().max()) == 0.0
    torch.testing.assert_close(case["outputs"]["output"], math.sin(t * math.pi / 2) * model)  # mergekit
    torch.testing.assert_close(_ours(case), t * model)  # ours: (1 − t)·0 + t·θ1


def test_nuslerp_with_a_zero_task_vector_interpolates_linearly():
    (case,) = _deviating("nuslerp_zero_task_vector")
    base, models = _inputs(case)
    w1, w2 = case["params"]["weight"]
    t = w2 / (w1 + w2)
    delta2 = models[1] - base
    assert torch.equal(models[0], base)
    torch.testing.assert_close(case["outputs"]["output"], base + math.sin(t * math.pi / 2) * delta2)
    torch.testing.assert_close(_ours(case), base + t * delta2)


def test_nuslerp_tiny_weight_sum_keeps_the_weight_ratio():
    (case,) = _deviating("nuslerp_tiny_weight_sum")
    w1, w2 = case["params"]["weight"]
    assert w1 + w2 < 1e-6
    scale = _scale(case)
    mergekit_t_half = _ours(case, weights=[1.0, 1.0])
    ours_ratio = _ours(case, weights=[w1 / (w1 + w2), w2 / (w1 + w2)])
    assert float(_relative_errors(mergekit_t_half, case["outputs"]["output"], scale).max()) <= F32_RTOL
    assert float(_relative_errors(_ours(case), ours_ratio, scale).max()) <= F32_RTOL
    assert float(_relative_errors(_ours(case), case["outputs"]["output"], scale).max()) > 1e-2


def test_multislerp_antipodal_pair_falls_back_to_the_linear_combination():
    """mergekit's fallback for a cancelling pair (‖Σ wi ui‖ < eps → Σ wi xi) does not fire in float32:
    the rounding of the unit vectors leaves ‖Σ wi ui‖ ≈ 1e-7 > eps = 1e-8, so mergekit normalizes that
    rounding noise and scales it to the mean norm. We return the linear combination it intends."""
    (case,) = _deviating("multislerp_antipodal_pair")
    _, (x0, x1) = _inputs(case)
    w0, w1 = (w / sum(case["params"]["weight"]) for w in case["params"]["weight"])
    golden = case["outputs"]["output"].double()
    mean_norm = w0 * x0.double().norm() + w1 * x1.double().norm()
    linear = w0 * x0.double() + w1 * x1.double()
    torch.testing.assert_close(golden.norm(), mean_norm, rtol=1e-5, atol=0)  # noise direction, mean norm
    assert float((golden - linear).norm() / linear.norm()) > 0.5
    torch.testing.assert_close(_ours(case).double(), linear, rtol=0, atol=F32_RTOL * _scale(case))


def test_multislerp_of_zero_task_vectors_returns_the_base():
    (case,) = _deviating("multislerp_zero_task_vectors")
    base, _ = _inputs(case)
    assert "weighted sum of the input tensors is zero" in case["mergekit_error"]
    assert torch.equal(_ours(case), base)


def _model_stock_cosines(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (one row unless filter_wise): mean pairwise cosine c, the base and the mean task vector,
    in float64 and in rows."""
    base, models = _inputs(case)
    width = base.shape[-1] if case["params"].get("filter_wise") and base.dim() >= 2 else base.numel()
    b = base.double().reshape(-1, width)
    deltas = [m.double().reshape(-1, width) - b for m in models]
    units = [d / d.norm(dim=1, keepdim=True) for d in deltas]
    pairs = [(units[i] * units[j]).sum(dim=1) for i in range(len(units)) for j in range(i + 1, len(units))]
    return torch.stack(pairs).mean(dim=0), b, torch.stack(deltas).mean(dim=0)


def test_model_stock_negative_cosine_keeps_the_base():
    """mergekit uses t = N c/(1 + (N − 1) c) < 0 when c < 0 (extrapolating away from the models); we clamp
    c at 0, so such rows stay at the base, and rows with c ≥ 0 still match mergekit."""
    for case in _deviating("model_stock_negative_cosine"):
        n = case["n_models"]
        c, b, mean_delta = _model_stock_cosines(case)
        golden = case["outputs"]["output"].double().reshape(b.shape)
        ours = _ours(case).double().reshape(b.shape)
        negative = c < 0
        assert bool(negative.any())
        t_mergekit = n * c / (1 + (n - 1) * c)
        torch.testing.assert_close(golden, b + t_mergekit[:, None] * mean_delta, rtol=1e-4, atol=1e-6)
        assert float(t_mergekit[negative].max()) < 0
        torch.testing.assert_close(ours[negative], b[negative], rtol=0, atol=1e-7)
        torch.testing.assert_close(ours[~negative], golden[~negative], rtol=0, atol=F32_RTOL * _scale(case))


def test_model_stock_conforming_fixtures_have_nonnegative_cosines():
    """The fixtures compared for equality sit where no clamp applies (else they belong to the deviation)."""
    for case in (c for c in CONFORMING if c["method"] == "model_stock"):
        c, _, _ = _model_stock_cosines(case)
        assert bool((c >= 0).all()), case["id"]


def test_ramplus_without_unique_entries_stays_finite():
    (case,) = _deviating("ramplus_no_unique_entries")
    base, models = _inputs(case)
    assert torch.equal(models[0], base) and case["params"]["epsilon"] == 0.0
    assert bool(torch.isnan(case["outputs"]["output"]).all())  # mergekit: 0/0 spreads to every entry
    # model 0 has no active entry, so every active entry of model 1 is unique and its ratio ρ is 0: λ = 1
    torch.testing.assert_close(_ours(case), models[1], rtol=0, atol=1e-7)


def test_della_single_entry_rows_keep_with_probability_density():
    """mergekit computes 0/0 ranks for rows of one entry and torch.bernoulli rejects the NaN; we use p = ρ."""
    for case in _deviating("della_single_entry_rows"):
        assert "p_in >= 0 && p_in <= 1" in case["mergekit_error"]
        base, (model,) = _inputs(case)
        delta = model.double() - base.double()
        out = _ours(case).double()
        kept = out != base.double()
        assert 0 < int(kept.sum()) < kept.numel()
        s = float(delta.abs().sum() / delta[kept].abs().sum())
        torch.testing.assert_close(out[kept] - base.double()[kept], s * delta[kept], rtol=1e-6, atol=0)


def test_karcher_honours_weights():
    """mergekit's karcher has no ``weight`` parameter (its YAML resolver drops it; α = 1/N always). Ours
    uses them: equal weights of any size reproduce mergekit, unequal ones move the mean toward the heavy
    model."""
    case = next(c for c in CONFORMING if c["method"] == "karcher" and c["dtype"] == "f32" and c["n_models"] == 5)
    golden, scale = case["outputs"]["output"], _scale(case)
    _, models = _inputs(case)
    assert float(_relative_errors(_ours(case, weights=[2.0] * 5), golden, scale).max()) <= F32_RTOL
    heavy = _ours(case, weights=[4.0, 1.0, 1.0, 1.0, 1.0])
    assert float(_relative_errors(heavy, golden, scale).max()) > 1e-2

    def cos(a, b):
        return float((a.double() * b.double()).sum() / (a.double().norm() * b.double().norm()))

    assert cos(heavy, models[0]) > cos(golden, models[0])


def test_karcher_zero_model_is_left_out_of_the_norm():
    """mergekit drops an all-zero model from the direction but averages its zero norm into the output
    norm (shrinking it by (N − 1)/N); by default we average over the models that have a direction, and
    ``norm_average: all`` reproduces mergekit."""
    (case,) = _deviating("karcher_zero_model_norm")
    _, models = _inputs(case)
    n = len(models)
    zero = [float(m.abs().max()) == 0.0 for m in models]
    assert sum(zero) == 1
    golden, scale = case["outputs"]["output"], _scale(case)
    assert float(_relative_errors(_ours(case, norm_average="all"), golden, scale).max()) <= F32_RTOL
    ours = _ours(case)
    assert float(_relative_errors(ours, golden * n / (n - 1), scale).max()) <= F32_RTOL


def test_karcher_antipodal_pair_raises():
    """mergekit: the chord mean of u and −u vanishes, it restarts from u_1, every θ/sin θ term is either
    skipped (θ = 0) or multiplies an exactly zero vector, so it returns model 0's direction times the mean
    norm, an arbitrary choice between the two. Ours raises AntipodalError (the mean is not unique)."""
    (case,) = _deviating("karcher_antipodal")
    _, (x0, x1) = _inputs(case)
    mean_norm = (x0.double().norm() + x1.double().norm()) / 2
    expected = mean_norm * x0.double() / x0.double().norm()
    torch.testing.assert_close(case["outputs"]["output"].double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(errors.AntipodalError):
        _ours(case)
