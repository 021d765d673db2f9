"""geomerge_factors: the quotient Fréchet mean of LoRA updates (GeoMerge paper §3.6), its symmetry claim and
input checks."""
from __future__ import annotations

import pytest
import torch

from karcher_lab.errors import (
    AntipodalError,
    EmptyInputError,
    ManifoldError,
    NonFiniteError,
    NotSupportedError,
    ParameterError,
    ShapeMismatchError,
    StepSizeError,
    WeightError,
)
from karcher_lab.geometry import lowrank
from karcher_lab.methods.lora import geomerge
from karcher_lab.methods.lora.geomerge import geomerge_factors

F64 = torch.float64
D1, D2, R = 12, 10, 3



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(seed, d1=D1, d2=D2, r=R):
    g = _gen(seed)
    return torch.randn(d1, r, dtype=F64, generator=g), torch.randn(d2, r, dtype=F64, generator=g)


def _gl(seed, r=R):
    """A random well-conditioned A ∈ GL(r)."""
    return torch.randn(r, r, dtype=F64, generator=_gen(seed)) + 3 * torch.eye(r, dtype=F64)


def _reparametrize(pair, a):
    g, h = pair
    return g @ torch.linalg.inv(a), h @ a.T


def _dw(g, h):
    return g @ h.T


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_one_adapter_comes_back():
    pair = _pair(1)
    g, h = geomerge_factors([pair])
    assert _rel(_dw(g, h), _dw(*pair)) < 1e-12


def test_copies_of_one_update_in_different_factorizations_come_back():
    pair = _pair(2)
    copies = [pair] + [_reparametrize(pair, _gl(10 + k)) for k in range(3)]
    g, h, trace = geomerge_factors(copies, [1.0, 2.0, 3.0, 4.0], init="first", return_trace=True)
    assert trace.converged
    assert _rel(_dw(g, h), _dw(*pair)) < 1e-10


def test_the_merge_does_not_depend_on_the_factorization_but_factor_averaging_does():
    """The paper's core claim: (G A⁻¹, H Aᵀ) is the same adapter, and geomerge gives the same ΔW (to the
    solver's tolerance: the iterates differ by rounding, and the mean is fixed to about tol / curvature;
    measured 1.6e-11 at tol 1e-9, 2.4e-9 at the default 1e-6)."""
    pairs = [_pair(3), _pair(4), _pair(5)]
    changed = [_reparametrize(pairs[0], _gl(6))] + pairs[1:]
    merged = _dw(*geomerge_factors(pairs, tol=1e-9))
    merged_changed = _dw(*geomerge_factors(changed, tol=1e-9))
    assert _rel(merged_changed, merged) < 1e-8

    def factor_average(ps):
        return _dw(sum(p[0] for p in ps) / len(ps), sum(p[1] for p in ps) / len(ps))

    assert _rel(factor_average(changed), factor_average(pairs)) > 0.1


def test_every_adapter_reparametrized_and_reordered_gives_the_same_merge():
    pairs = [_pair(7), _pair(8), _pair(9)]
    w = [0.5, 0.3, 0.2]
    merged = _dw(*geomerge_factors(pairs, w, tol=1e-9))
    shuffled = [_reparametrize(pairs[k], _gl(20 + k)) for k in (2, 0, 1)]
    assert _rel(_dw(*geomerge_factors(shuffled, [w[2], w[0], w[1]], tol=1e-9)), merged) < 1e-8


def test_shared_subspaces_give_the_weighted_geometric_mean_of_the_spectra():
    """ΔW_i = U diag(a_i) Vᵀ with one U, V and equally ordered spectra: the Stiefel parts coincide, the SPD
    parts commute, so the quotient mean is U diag(Π_i a_i^{w_i}) Vᵀ (the affine-invariant mean)."""
    u = torch.linalg.qr(torch.randn(D1, R, dtype=F64, generator=_gen(30)))[0]
    v = torch.linalg.qr(torch.randn(D2, R, dtype=F64, generator=_gen(31)))[0]
    spectra = torch.tensor([[9.0, 3.0, 1.0], [4.0, 2.0, 0.5], [6.0, 5.0, 0.1]], dtype=F64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    pairs = [_reparametrize((u * s, v), _gl(32 + k)) for k, s in enumerate(spectra)]
    g, h = geomerge_factors(pairs, w)
    expected = u @ torch.diag((w[:, None] * spectra.log()).sum(0).exp()) @ v.T
    assert _rel(_dw(g, h), expected) < 1e-10


def test_output_has_rank_r_balanced_factors_and_lowers_the_objective():
    pairs = [_pair(40), _pair(41), _pair(42)]
    g, h, trace = geomerge_factors([(p[0].float(), p[1].float()) for p in pairs], return_trace=True)
    assert g.dtype == torch.float32 and g.shape == (D1, R) and h.shape == (D2, R)
    assert trace.converged and trace.residual < 1e-6
    assert int(torch.linalg.matrix_rank(_dw(g.double(), h.double()))) == R
    assert torch.allclose(g.T @ g, h.T @ h, rtol=1e-4, atol=1e-5)  # balanced: both are diag(σ)
    objectives = trace.frechet.objectives
    assert float(objectives[-1]) < float(objectives[0])
    # no input is a better merge than the result: F(μ*) ≤ F(θ_i)
    mu = lowrank.polar_from_factors(g.double(), h.double())
    batch = lowrank.Polar(*(torch.stack(x) for x in zip(*(lowrank.polar_from_factors(*p) for p in pairs))))
    for i in range(3):
        ref = lowrank.Polar(*(x[i] for x in batch))
        f_i = 0.5 * float((lowrank.quotient_dist(ref, batch) ** 2).mean())
        assert float(objectives[-1]) <= f_i + 1e-9
    assert float(objectives[-1]) == pytest.approx(0.5 * float((lowrank.quotient_dist(mu, batch) ** 2).mean()), rel=1e-6)


def test_rank_one_updates_on_a_shared_line_merge_to_the_weighted_geometric_mean():
    """r = 1, O(1) = {±1}: s_i u vᵀ with one column and row space merge to (Π s_i^{w_i}) u vᵀ."""
    u, v = _pair(70, r=1)
    g, h = geomerge_factors([(2.0 * u, -v), (-8.0 * u, v)], [0.5, 0.5])  # the sign may sit in either factor
    assert g.shape == (D1, 1)
    assert _rel(_dw(g, h), -4.0 * (u @ v.T)) < 1e-10


def test_an_update_and_its_negative_have_no_unique_mean():
    g, h = _pair(72, r=1)
    with pytest.raises(AntipodalError):
        geomerge_factors([(g, h), (-g, h)])


def _gaussian_adapters(seed, n, d, r):
    gen = _gen(seed)
    return [(torch.randn(d, r, dtype=F64, generator=gen), torch.randn(d, r, dtype=F64, generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize(
    "seed, n, d, r, needs_surrogate",
    [
        # raised ConvergenceError: Zimmermann's iteration did not converge from the start (the surrogate
        # took over there); with the Anderson-accelerated iteration every log converges
        (6, 2, 32, 8, False),
        (4001, 4, 128, 8, True),  # raised AntipodalError: a cold alignment candidate on the cut locus
    ],
)
def test_nearly_orthogonal_adapters_merge_to_the_exact_mean(seed, n, d, r, needs_surrogate):
    """Gaussian rank-8 adapters (principal angles between column spaces up to ~90°, as for real LoRA
    modules) used to raise: logs beyond their domain now use the projection surrogate on the way, and
    the returned mean has exact logs only. It is a local minimum of F (F grows along ± random horizontal
    directions), its F is the quotient distance's, and reparametrizing an adapter leaves ΔW unchanged."""
    pairs = _gaussian_adapters(seed, n, d, r)
    g, h, trace = geomerge_factors(pairs, return_trace=True)
    assert trace.converged and trace.final_fallbacks == 0
    assert (sum(trace.surrogates_computed) > 0) == needs_surrogate  # the surrogate on the way, where needed
    mu = lowrank.polar_from_factors(g, h)
    batch = lowrank.Polar(*(torch.stack(x) for x in zip(*(lowrank.polar_from_factors(*p) for p in pairs))))

    def objective(point):
        return 0.5 * float((lowrank.quotient_dist(point, batch) ** 2).mean())

    f_mu = objective(mu)
    assert f_mu == pytest.approx(float(trace.frechet.objectives[-1]), rel=1e-6)
    assert f_mu < float(trace.frechet.objectives[0])
    gen = _gen(seed + 1)
    for _ in range(2):
        xi = lowrank.PolarTangent(*(torch.randn(x.shape, dtype=F64, generator=gen) for x in mu))
        xi = lowrank.transport(mu, mu, lowrank.PolarTangent(xi.U, 0.5 * (xi.B + xi.B.T), xi.V))
        xi = lowrank.PolarTangent(*(t * (0.05 / float(lowrank.norm(mu, xi))) for t in xi))
        for sign in (1.0, -1.0):
            assert objective(lowrank.exp(mu, lowrank.PolarTangent(*(sign * t for t in xi)))) > f_mu
    a = _gl(seed + 2, r)
    changed = [_reparametrize(pairs[0], a)] + pairs[1:]
    assert _rel(_dw(*geomerge_factors(changed)), _dw(g, h)) < 1e-4


def test_lbfgs_and_the_papers_plain_step_reach_the_same_mean():
    pairs = [_pair(80), _pair(81), _pair(82)]
    g0, h0, plain = geomerge_factors(pairs, tol=1e-7, memory=0, max_iter=2000, return_trace=True)
    g1, h1, fast = geomerge_factors(pairs, tol=1e-7, return_trace=True)
    assert plain.converged and fast.converged and fast.iterations < plain.iterations
    assert _rel(_dw(g1, h1), _dw(g0, h0)) < 1e-5
    assert float(fast.frechet.objectives[-1]) == pytest.approx(float(plain.frechet.objectives[-1]), rel=1e-10)


def test_a_zero_weight_leaves_that_adapter_out():
    pairs = [_pair(50), _pair(51)]
    g, h, trace = geomerge_factors(pairs, [1.0, 0.0], return_trace=True)
    assert trace.kept == [0]
    assert _rel(_dw(g, h), _dw(*pairs[0])) < 1e-12


def test_non_convergence_warns():
    with pytest.warns(RuntimeWarning, match="stopped after 1 iterations"):
        geomerge_factors([_pair(60), _pair(61), _pair(62)], max_iter=1, tol=1e-12)


@pytest.mark.parametrize(
    "pairs, kwargs, error",
    [
        ([], {}, EmptyInputError),
        ([_pair(1), _pair(2, d1=D1 + 1)], {}, ShapeMismatchError),
        ([_pair(1), _pair(2, r=R + 1)], {}, ShapeMismatchError),
        ([(torch.randn(4, 6, dtype=F64), torch.randn(5, 6, dtype=F64))], {}, ShapeMismatchError),  # r > min(d1, d2)
        ([(torch.randn(D1, R, dtype=F64), torch.randn(D2, R + 1, dtype=F64))], {}, ShapeMismatchError),
        ([(torch.randn(D1, dtype=F64), torch.randn(D2, dtype=F64))], {}, ShapeMismatchError),
        ([(torch.full((D1, R), float("nan"), dtype=F64), torch.randn(D2, R, dtype=F64))], {}, NonFiniteError),
        ([(torch.zeros(D1, R, dtype=F64), torch.randn(D2, R, dtype=F64))], {}, ManifoldError),  # ΔW = 0
        ([_pair(1), _pair(2)], {"weights": [1.0, -1.0]}, WeightError),
        ([_pair(1), _pair(2)], {"weights": [1.0]}, WeightError),
        ([_pair(1), _pair(2)], {"weights": [float("inf"), 1.0]}, WeightError),
        ([_pair(1), _pair(2)], {"eta": 0.0}, StepSizeError),
        ([_pair(1), _pair(2)], {"max_iter": -1}, ParameterError),
        ([_pair(1), _pair(2)], {"init": "median"}, ParameterError),
        ([_pair(1), _pair(2)], {"align_tol": 0.0}, ParameterError),
        ([_pair(1), _pair(2)], {"memory": -2}, ParameterError),
        ([_pair(1), _pair(2)], {"geodesic": "yes"}, ParameterError),
        ([_pair(1, d1=5, d2=8, r=3)], {}, NotSupportedError),  # 2r > min(d1, d2)
    ],
)
def test_bad_input_raises_a_specific_error(pairs, kwargs, error):
    with pytest.raises(error):
        geomerge_factors(pairs, **kwargs)


def test_the_cold_alignment_stops_at_its_own_threshold_and_reaches_the_same_mean(monkeypatch):
    """The cold alignment to the start stops at COLD_ALIGN_TOL (trace: its residual below it, later ones
    finer); the mean equals the one reached with the cold alignment run to align_tol, to the solver's
    tolerance, on nearly orthogonal adapters (the hard case)."""
    pairs = _gaussian_adapters(7, 3, 48, 6)
    g, h, trace = geomerge_factors(pairs, return_trace=True)
    assert trace.converged and trace.align_residuals[0] < geomerge.COLD_ALIGN_TOL
    assert trace.align_residuals[-1] < 1e-6
    monkeypatch.setattr(geomerge, "COLD_ALIGN_TOL", 1e-9)
    g_strict, h_strict, strict = geomerge_factors(pairs, return_trace=True)
    assert strict.align_iterations[0] > trace.align_iterations[0]
    dw, dw_strict = g @ h.T, g_strict @ h_strict.T
    assert float((dw - dw_strict).norm() / dw_strict.norm()) < 1e-5


def _nearby_pairs(seed, spread):
    """Two adapters, the second a perturbation of the first: far enough apart for curvature to matter, close
    enough for every orbit alignment to have one minimum."""
    g, h = _pair(seed)
    gen = _gen(seed + 1)
    return [(g, h), (g + spread * torch.randn(g.shape, dtype=F64, generator=gen),
                     h + spread * torch.randn(h.shape, dtype=F64, generator=gen))]


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.3, 0.7]])
def test_two_adapters_merge_to_the_weighted_point_of_the_quotient_geodesic(weights):
    """For N = 2 the mean is the point at t = w_2 of the quotient geodesic: d([μ], [θ_1]) = w_2 D and
    d([μ], [θ_2]) = w_1 D with D = d([θ_1], [θ_2]); the outer iteration has nothing left to do."""
    pairs = _nearby_pairs(91, 0.6)
    g, h, trace = geomerge_factors(pairs, weights, return_trace=True)
    assert trace.geodesic_iterations is not None and trace.iterations == 0 and trace.converged
    points = lowrank.Polar(*(torch.stack(x) for x in zip(*(lowrank.polar_from_factors(*p) for p in pairs))))
    first = lowrank.Polar(*(t[0] for t in points))
    span = float(lowrank.quotient_dist(first, lowrank.Polar(*(t[1:] for t in points)), tol=1e-12, max_iter=500)[0])
    to_inputs = lowrank.quotient_dist(lowrank.polar_from_factors(g, h), points, tol=1e-12, max_iter=500)
    assert span > 0.5
    assert float(to_inputs[0]) == pytest.approx(weights[1] * span, abs=1e-6)
    assert float(to_inputs[1]) == pytest.approx(weights[0] * span, abs=1e-6)


def test_the_geodesic_start_and_the_outer_iteration_reach_the_same_mean():
    """Without the two-input geodesic (geodesic=False, as where its alignment meets a log beyond reach) the
    outer iteration runs from the truncated mean and reaches the same mean, to the solver's tolerance."""
    pairs = _nearby_pairs(92, 0.6)
    g, h, trace = geomerge_factors(pairs, [0.4, 0.6], return_trace=True)
    g_it, h_it, iterated = geomerge_factors(pairs, [0.4, 0.6], geodesic=False, return_trace=True)
    assert iterated.geodesic_iterations is None and iterated.iterations > 5 and iterated.converged
    assert trace.geodesic_iterations is not None and trace.iterations == 0
    assert _rel(_dw(g, h), _dw(g_it, h_it)) < 1e-5
    assert float(trace.frechet.objectives[-1]) == pytest.approx(float(iterated.frechet.objectives[-1]), rel=1e-9)
