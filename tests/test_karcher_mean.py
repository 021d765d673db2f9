"""Coefficient-space Karcher mean (karcher_lab.geometry.karcher_mean) against a direct float64
iteration of eq. 5, the first-order condition (eq. 4), SLERP, and its bad-input errors."""
from __future__ import annotations

import math

import pytest
import torch

from karcher_lab.errors import AntipodalError, ParameterError, StepSizeError, WeightError
from karcher_lab.geometry import blocks, karcher_mean as km, numerics, sphere
from karcher_lab.geometry.blocks import block_layout

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _experts(n, shape, seed=0, spread=1.0, dtype=F64):
    """n tensors sharing a common component, plus independent noise of relative size ``spread``."""
    common = torch.randn(*shape, generator=_gen(seed), dtype=F64)
    return [(common + spread * torch.randn(*shape, generator=_gen(seed + 1 + i), dtype=F64)).to(dtype) for i in range(n)]


def _as_blocks(x, block):
    """x as [B, D]: one row per block (the test's own, independent view of the granularities)."""
    if x.ndim <= 1 or block == "tensor":
        return x.reshape(1, -1)
    if block == "row":
        return x.reshape(x.shape[0], -1)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _direct_karcher(xs, alpha, *, block="tensor", eta=1.0, steps=20, init="chord"):
    """Literal eq. 5 in float64 on the data: v = Σ α_i Log_u(u_i), u ← Exp_u(η v), ``steps`` times.

    Returns the unit mean as [B, D] and ‖v‖ per iterate, [steps + 1, B].
    """
    units = [_as_blocks(x.to(F64), block) for x in xs]
    units = [u / u.norm(dim=-1, keepdim=True) for u in units]
    alpha = torch.as_tensor(alpha, dtype=F64)
    alpha = alpha / alpha.sum()
    if init == "chord":
        u = sum(a * ui for a, ui in zip(alpha, units))
        u = u / u.norm(dim=-1, keepdim=True)
    else:
        u = units[0].clone()
    history = []
    for k in range(steps + 1):
        v = sum(a * sphere.log(u, ui, batch_dims=1) for a, ui in zip(alpha, units))
        history.append(v.norm(dim=-1))
        if k == steps:
            break
        u = sphere.exp(u, eta * v, batch_dims=1)
    return u, torch.stack(history)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


CASES = [  # (N, shape, block, weights, eta, init)
    (2, (40,), "tensor", [1.0, 3.0], 1.0, "chord"),
    (3, (12, 9), "tensor", [0.2, 0.5, 0.3], 0.5, "chord"),
    (5, (12, 9), "row", [1.0, 1.0, 2.0, 1.0, 0.5], 1.0, "chord"),
    (5, (12, 9), "column", [1.0] * 5, 0.7, "first"),
    (4, (6, 5, 3), "row", [0.1, 0.2, 0.3, 0.4], 1.0, "first"),
    (8, (6, 5, 3), "column", list(range(1, 9)), 0.9, "chord"),
    (3, (16,), "row", [2.0, 1.0, 1.0], 0.3, "chord"),
]


@pytest.mark.parametrize("n,shape,block,weights,eta,init", CASES)
def test_coefficient_space_equals_the_direct_float64_iteration(n, shape, block, weights, eta, init):
    xs = _experts(n, shape, seed=n, spread=0.8)
    steps = 15
    ours, trace = km.karcher_mean(xs, weights, block=block, eta=eta, max_iter=steps, tol=0.0, init=init)
    ref, history = _direct_karcher(xs, weights, block=block, eta=eta, steps=steps, init=init)
    assert ours.dtype == F64 and ours.shape == xs[0].shape
    assert _rel(_as_blocks(ours, block), ref) <= 1e-10
    # tol = 0: every step is taken, unless ‖v‖ is exactly 0 (two points, η = 1: one step is exact)
    k = trace.iterations
    assert k == steps or float(trace.residuals[-1]) == 0.0
    assert trace.residuals.shape == (k + 1,)
    torch.testing.assert_close(trace.residuals, history[: k + 1].amax(-1), rtol=1e-8, atol=1e-15)
    torch.testing.assert_close(trace.block_residuals, history[k], rtol=1e-8, atol=1e-15)


@pytest.mark.parametrize("block", ["tensor", "row", "column"])
def test_converged_mean_satisfies_the_first_order_condition(block):
    xs = _experts(5, (10, 8), seed=3, spread=1.5)
    alpha = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=F64)
    mean, trace = km.karcher_mean(xs, alpha, block=block, tol=1e-12)
    assert trace.converged and trace.residual < 1e-12
    u = _as_blocks(mean, block)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(u.shape[0], dtype=F64), rtol=0, atol=1e-14)
    units = [_as_blocks(x, block) / _as_blocks(x, block).norm(dim=-1, keepdim=True) for x in xs]
    grad = sum(a * sphere.log(u, ui, batch_dims=1) for a, ui in zip(alpha, units))  # eq. 4
    assert float(grad.norm(dim=-1).max()) < 1e-11


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_residual_trace_decreases_until_converged(eta):
    xs = _experts(5, (64,), seed=11, spread=1.0)
    _, trace = km.karcher_mean(xs, [1, 2, 3, 4, 5], eta=eta, tol=1e-9)
    r = trace.residuals
    assert trace.converged and 3 <= trace.iterations < 200
    assert bool((r[1:] < r[:-1]).all()), r
    assert float(r[-1]) < 1e-9 <= float(r[-2])


def test_two_points_one_step_from_the_first_is_slerp():
    """Paper §3.3: N = 2, η = 1, started at u_1, one step lands on the geodesic at t = α_2."""
    x1, x2 = _experts(2, (30,), seed=5, spread=2.0)
    u1, u2 = x1 / x1.norm(), x2 / x2.norm()
    theta = math.acos(float(u1 @ u2))
    for a2 in (0.25, 0.5, 0.9):
        mean, trace = km.karcher_mean([x1, x2], [1 - a2, a2], init="first", tol=1e-12)
        slerp = (math.sin((1 - a2) * theta) * u1 + math.sin(a2 * theta) * u2) / math.sin(theta)
        torch.testing.assert_close(mean, slerp, rtol=0, atol=1e-14)
        assert trace.iterations == 1


def test_inits_and_cached_gram_resolve_agree():
    xs = _experts(4, (20, 3), seed=8, spread=1.2)
    gram = km.gram_matrix(xs, "row")
    for w in ([1, 1, 1, 1], [4, 1, 0.5, 2]):
        chord, _ = km.karcher_coefficients(gram, w, tol=1e-12)
        first, _ = km.karcher_coefficients(gram, w, tol=1e-12, init="first")
        assert _rel(km.combine(xs, first, "row"), km.combine(xs, chord, "row")) < 1e-11
        fresh, _ = km.karcher_mean(xs, w, block="row", tol=1e-12)
        assert _rel(km.combine(xs, chord, "row"), fresh) < 1e-14


@pytest.mark.parametrize("block", ["tensor", "row", "column"])
@pytest.mark.parametrize("shape", [(33,), (67,), (9, 7), (4, 5, 6), (3, 80), (40, 3, 2)])
def test_streamed_gram_matches_einsum_for_every_chunking(block, shape, monkeypatch):
    """Every chunk kind, and both ways of multiplying (batched products for runs of ≥ GRAM_MIN_RUN
    entries per block; elementwise for shorter runs)."""
    xs = _experts(3, shape, seed=2)
    base = torch.randn(*shape, generator=_gen(99), dtype=F64)
    ref = lambda ys: torch.einsum("nbd,mbd->bnm", *[torch.stack([_as_blocks(y, block) for y in ys])] * 2)
    for buffer_bytes in (8 * 4, 8 * 4 * 5, 8 * 4 * 40, 8 * 4 * 200, km.GRAM_BUFFER_BYTES):
        monkeypatch.setattr(km, "GRAM_BUFFER_BYTES", buffer_bytes)
        torch.testing.assert_close(km.gram_matrix(xs, block), ref(xs), rtol=1e-14, atol=1e-13)
        centered = km.gram_matrix(xs, block, center=base)
        torch.testing.assert_close(centered, ref([x - base for x in xs]), rtol=1e-14, atol=1e-13)
        metric = base.abs()  # a diagonal metric: ⟨x, y⟩_m = Σ m x y
        weighted = km.gram_matrix(xs, block, center=base, metric=metric)
        torch.testing.assert_close(weighted, ref([(x - base) * metric.sqrt() for x in xs]), rtol=1e-13, atol=1e-13)


def test_combine_applies_one_coefficient_per_block(monkeypatch):
    xs = _experts(3, (6, 4), seed=4)
    coeffs = torch.randn(4, 3, generator=_gen(5), dtype=F64)  # column blocks
    expected = sum(coeffs[:, j] * xs[j] for j in range(3))
    monkeypatch.setattr(km, "COMBINE_CHUNK_BYTES", 8 * 5)
    torch.testing.assert_close(km.combine(xs, coeffs, "column"), expected, rtol=1e-14, atol=1e-14)
    rows = torch.randn(6, 3, generator=_gen(6), dtype=F64)
    torch.testing.assert_close(km.combine(xs, rows, "row"), sum(rows[:, j, None] * xs[j] for j in range(3)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_accumulate_the_gram_in_float64(dtype):
    xs = _experts(4, (128, 96), seed=6, spread=0.3, dtype=dtype)
    exact = [x.to(F64) for x in xs]  # the values the low-precision tensors hold, exactly
    gram = km.gram_matrix(xs)
    assert gram.dtype == F64
    ref = torch.stack([x.flatten() for x in exact])
    torch.testing.assert_close(gram[0], ref @ ref.T, rtol=1e-13, atol=0)
    mean, _ = km.karcher_mean(xs, tol=1e-10)
    assert mean.dtype == torch.float32
    direct, _ = _direct_karcher(exact, [1.0] * 4, steps=30)
    assert _rel(mean.to(F64).reshape(1, -1), direct) < 1e-6  # float32 output rounding only


def _float64_gram(xs, block="tensor", center=None, metric=None):
    """The test's own float64 Gram: einsum over exact float64 copies."""
    ys = [x.to(F64) - (0 if center is None else center.to(F64)) for x in xs]
    if metric is not None:
        ys = [y * metric.to(F64).sqrt() for y in ys]
    stacked = torch.stack([_as_blocks(y, block) for y in ys])
    return torch.einsum("nbd,mbd->bnm", stacked, stacked)


def _unit_gram_error(gram, ref):
    norms = ref.diagonal(dim1=-2, dim2=-1).sqrt()
    return float(((gram - ref) / (norms.unsqueeze(-1) * norms.unsqueeze(-2))).abs().max())


def test_large_whole_tensors_take_float32_runs_accumulated_in_float64():
    """A 2^20-entry float32 tensor (default thresholds): products and run sums in float32, runs summed in
    float64; the error in the normalized Gram stays ~1e-8 (independent, correlated and positive data)."""
    g = _gen(20)
    shape = (1024, 1024)
    assert shape[0] * shape[1] >= km.GRAM_FLOAT32_BLOCK
    base = torch.randn(shape, generator=g)
    kinds = [
        [torch.randn(shape, generator=g) for _ in range(3)],
        [base + 0.05 * torch.randn(shape, generator=g) for _ in range(3)],
        [torch.rand(shape, generator=g) + 0.5 for _ in range(3)],
    ]
    for xs in kinds:
        gram, ref = km.gram_matrix(xs), _float64_gram(xs)
        assert 0 < _unit_gram_error(gram, ref) < 5e-8  # non-zero: the float32 path was taken
    assert _unit_gram_error(km.gram_matrix(kinds[1], center=base), _float64_gram(kinds[1], center=base)) < 5e-8
    # row blocks and float64 inputs keep float64 products: exact
    torch.testing.assert_close(km.gram_matrix(kinds[0], "row"), _float64_gram(kinds[0], "row"), rtol=1e-13, atol=1e-9)


@pytest.mark.parametrize("shape", [(41, 37), (1500,)])
def test_float32_runs_cover_every_chunk_and_tail(shape, monkeypatch):
    """Small thresholds so that runs, chunk ends and a tail shorter than a run all occur."""
    monkeypatch.setattr(km, "GRAM_FLOAT32_BLOCK", 1000)
    monkeypatch.setattr(km, "GRAM_FLOAT32_RUN", 64)
    xs = [x.float() for x in _experts(4, shape, seed=21)]
    base = torch.randn(*shape, generator=_gen(22))
    metric = torch.rand(*shape, generator=_gen(23)) + 0.1
    for buffer_bytes in (4 * 64 * 6, 4 * 64 * 6 * 7 + 12, km.GRAM_BUFFER_BYTES):
        monkeypatch.setattr(km, "GRAM_BUFFER_BYTES", buffer_bytes)
        for center, m in ((None, None), (base, None), (base, metric)):
            gram = km.gram_matrix(xs, center=center, metric=m)
            assert 0 < _unit_gram_error(gram, _float64_gram(xs, center=center, metric=m)) < 1e-6


def test_float32_runs_fall_back_to_float64_where_float32_would_underflow_or_overflow(monkeypatch):
    monkeypatch.setattr(km, "GRAM_FLOAT32_BLOCK", 1000)
    xs = [x.float() for x in _experts(3, (40, 50), seed=24)]
    cases = {
        "tiny values (squares underflow float32)": [1e-22 * x for x in xs],
        "huge values (squares overflow float32)": [1e21 * x for x in xs],
        "a zero task vector": [xs[0], xs[1], xs[2].clone()],
    }
    for label, ys in cases.items():
        center = xs[2] if label == "a zero task vector" else None
        gram = km.gram_matrix(ys, center=center)
        torch.testing.assert_close(gram, _float64_gram(ys, center=center), rtol=1e-13, atol=0, msg=label)


@pytest.fixture
def threads():
    """Sets torch's thread count for a test and restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("block", ["tensor", "row", "column"])
def test_chunked_passes_give_the_same_bits_on_any_number_of_threads(block, threads, monkeypatch):
    """The Gram's partials are added in chunk order whichever worker thread formed them, and each chunk is
    computed on one torch thread: 1, 2 and 3 threads give identical Grams and combinations (many chunks)."""
    monkeypatch.setattr(km, "GRAM_FLOAT32_BLOCK", 1000)
    monkeypatch.setattr(km, "GRAM_FLOAT32_RUN", 64)
    monkeypatch.setattr(km, "GRAM_BUFFER_BYTES", 4 * 64 * 6 * 3)
    monkeypatch.setattr(km, "COMBINE_CHUNK_BYTES", 4 * 100)
    xs = [x.float() for x in _experts(4, (48, 40), seed=30, spread=0.5)]
    base = torch.randn(48, 40, generator=_gen(31))
    metric = torch.rand(48, 40, generator=_gen(32)) + 0.1
    results = []
    for count in (1, 2, 3):
        threads(count)
        grams = [km.gram_matrix(xs, block), km.gram_matrix(xs, block, center=base, metric=metric)]
        coeffs, _ = km.karcher_coefficients(grams[0], [1.0, 2.0, 3.0, 4.0])
        results.append((grams, km.combine(xs, coeffs, block)))
        assert torch.get_num_threads() == count  # restored
    for grams, merged in results[1:]:
        assert all(torch.equal(g, g1) for g, g1 in zip(grams, results[0][0]))
        assert torch.equal(merged, results[0][1])
    torch.testing.assert_close(results[0][0][0], _float64_gram(xs, block), rtol=1e-6, atol=1e-6)


def test_run_on_threads_consumes_in_order_on_one_torch_thread_each_and_restores_the_count(threads):
    threads(2)
    seen, consumed = [], []

    def work(i):
        seen.append(torch.get_num_threads())
        return i * i

    numerics.run_on_threads(work, range(20), consumed.append, threads=2, lookahead=3)
    assert consumed == [i * i for i in range(20)] and seen == [1] * 20
    assert torch.get_num_threads() == 2
    numerics.run_on_threads(work, [7], consumed.append, threads=2)  # one item: in the calling thread
    assert consumed[-1] == 49 and seen[-1] == 1 and torch.get_num_threads() == 2

    def failing(i):
        if i == 5:
            raise ValueError("item 5")
        return i

    with pytest.raises(ValueError, match="item 5"):
        numerics.run_on_threads(failing, range(20), threads=2)
    assert torch.get_num_threads() == 2


def test_zero_norm_expert_contributes_no_direction():
    x1, x2, x3 = _experts(3, (10, 4), seed=7, spread=1.0)
    zero = torch.zeros_like(x1)
    with_zero, trace = km.karcher_mean([x1, zero, x2, x3], [1.0, 5.0, 2.0, 1.0], tol=1e-12)
    without, _ = km.karcher_mean([x1, x2, x3], [1.0, 2.0, 1.0], tol=1e-12)
    assert trace.converged and _rel(with_zero, without) < 1e-13
    # per block: a zero row drops out of that block only
    x1r = x1.clone()
    x1r[2] = 0
    rows, _ = km.karcher_mean([x1r, x2, x3], block="row", tol=1e-12)
    only23, _ = km.karcher_mean([x2[2], x3[2]], tol=1e-12)
    torch.testing.assert_close(rows[2], only23, rtol=0, atol=1e-14)


def test_all_zero_block_gives_zero():
    xs = _experts(3, (5, 4), seed=9)
    for x in xs:
        x[1] = 0
    mean, trace = km.karcher_mean(xs, block="row", tol=1e-12)
    assert torch.equal(mean[1], torch.zeros(4, dtype=F64)) and trace.converged
    assert bool(torch.isfinite(mean).all()) and float(mean[0].norm()) == pytest.approx(1.0, abs=1e-14)
    zero, trace = km.karcher_mean([torch.zeros(6, dtype=F64)] * 2)
    assert torch.equal(zero, torch.zeros(6, dtype=F64)) and trace.iterations == 0


def test_zero_weight_expert_is_ignored():
    xs = _experts(3, (17,), seed=10, spread=1.0)
    a, _ = km.karcher_mean(xs, [1.0, 0.0, 2.0], tol=1e-12)
    b, _ = km.karcher_mean([xs[0], xs[2]], [1.0, 2.0], tol=1e-12)
    assert _rel(a, b) < 1e-13


def test_nearly_antipodal_pair_raises_naming_tensor_and_models():
    x = torch.randn(20, generator=_gen(12), dtype=F64)
    other = torch.randn(20, generator=_gen(13), dtype=F64)
    with pytest.raises(AntipodalError, match=r"tensor 'w': models 1 and 2 are \(nearly\) antipodal"):
        km.karcher_mean([other, x, -x], name="w")
    nearly = -x + 1e-5 * x.norm() * (other - (other @ x) / (x @ x) * x) / other.norm()  # θ ≈ π − 1e-5
    with pytest.raises(AntipodalError, match="models 0 and 1"):
        km.karcher_mean([x, nearly], [1.0, 3.0])
    rows = torch.stack([x, other])
    with pytest.raises(AntipodalError, match="block 1 of 2"):
        km.karcher_mean([rows, torch.stack([x, -other])], block="row")


def test_points_not_in_a_hemisphere_raise():
    """Three unit vectors 120° apart on a great circle: the chord mean vanishes, the mean is not unique."""
    e1, e2 = torch.eye(3, dtype=F64)[:2]
    pts = [math.cos(a) * e1 + math.sin(a) * e2 for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    with pytest.raises(AntipodalError, match="chord mean of models \\[0, 1, 2\\] nearly vanishes"):
        km.karcher_mean(pts, name="t")
    with pytest.raises(AntipodalError):
        km.karcher_mean(pts, init="first")
    km.karcher_mean(pts, [1.0, 1.0, 1.2])  # unequal weights: a unique mean exists


@pytest.mark.parametrize("eta", [0.0, -0.5, 1.5, float("nan")])
def test_step_size_outside_0_1_raises(eta):
    xs = _experts(2, (5,))
    with pytest.raises(StepSizeError, match=r"\(0, 1\]"):
        km.karcher_mean(xs, eta=eta)
    with pytest.raises(StepSizeError):
        km.karcher_coefficients(km.gram_matrix(xs), [1, 1], eta=eta)


def test_bad_solver_arguments():
    xs = _experts(2, (5,))
    gram = km.gram_matrix(xs)
    with pytest.raises(ParameterError, match="max_iter"):
        km.karcher_coefficients(gram, [1, 1], max_iter=-1)
    with pytest.raises(ParameterError, match="tol"):
        km.karcher_coefficients(gram, [1, 1], tol=-1e-3)
    with pytest.raises(ParameterError, match="init"):
        km.karcher_coefficients(gram, [1, 1], init="random")
    with pytest.raises(WeightError, match="non-negative"):
        km.karcher_coefficients(gram, [1, -1])
    with pytest.raises(WeightError, match="karcher: all weights are zero"):
        km.karcher_coefficients(gram, [0, 0])
    with pytest.raises(WeightError, match="shape"):
        km.karcher_coefficients(gram, [1, 1, 1])
    rows = km.gram_matrix(_experts(2, (3, 4)), "row")  # per-block weights [3, 2]
    with pytest.raises(WeightError, match="tensor 'w': karcher: all weights of block 1 are zero"):
        km.karcher_coefficients(rows, [[1, 1], [0, 0], [2, 1]], name="w")
    with pytest.raises(WeightError, match="non-negative"):
        km.karcher_coefficients(rows, [[1, 1], [1, -1], [2, 1]])
    with pytest.raises(ParameterError, match="unknown block granularity 'cols'"):
        km.gram_matrix(xs, "cols")


def test_block_layouts():
    assert [block_layout((7,), b).blocks for b in blocks.BLOCK_GRANULARITIES] == [1, 1, 1]
    assert block_layout((), "row").blocks == 1
    assert (block_layout((4, 6), "row").blocks, block_layout((4, 6), "row").block_size) == (4, 6)
    assert (block_layout((4, 6), "column").blocks, block_layout((4, 6), "column").block_size) == (6, 4)
    assert (block_layout((4, 6, 2), "column").blocks, block_layout((4, 6, 2), "column").block_size) == (6, 8)
    layout = block_layout((5, 3, 4), "column")
    for budget in (1, 5, 13, 60, 1000):
        seen = torch.zeros(5, 3, 4, dtype=torch.int64)
        for chunk in layout.chunks(budget):
            seen[chunk] += 1
            assert seen[chunk].numel() <= budget
        assert bool((seen == 1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_matches_the_entrywise_check(dtype):
    """numerics.all_finite against torch.isfinite(x).all(), sums that overflow included."""
    big = torch.finfo(dtype).max
    nan, inf = float("nan"), float("inf")
    cases = [[1.0] * 12, [big, big], [big, -big, big], [], [1.0, nan], [inf, 1.0], [inf, -inf], [big, big, nan]]
    for values in cases:
        x = torch.tensor(values, dtype=dtype)
        assert numerics.all_finite(x) == bool(torch.isfinite(x).all()), x
