"""Collapse metrics: known answers, exact bootstrap reweighting, and constructed collapses."""
import math

import pytest
import torch

from karcher_lab.diagnostics import capture_activations, collapse_metrics, collapse_ratios, effective_rank, numerical_rank
from karcher_lab.diagnostics.collapse import METRICS, DEFAULT_RTOL, batched_eigvalsh, bootstrap_counts, layer_metrics
from karcher_lab.errors import InputError, ParameterError, WeightError


def test_effective_rank_known_answers():
    assert effective_rank(torch.eye(20)) == pytest.approx(20.0, rel=1e-6)
    u, v = torch.randn(30, 1, dtype=torch.float64), torch.randn(1, 12, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    gaussian = torch.randn(100, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert effective_rank(gaussian) == pytest.approx(19.45, abs=0.25)  # mean 19.45, sd 0.05 over seeds
    # two equal singular values and nothing else: erank 2; a scale changes nothing
    assert effective_rank(torch.diag(torch.tensor([3.0, 3.0, 0.0]))) == pytest.approx(2.0, rel=1e-6)
    # p = (2/3, 1/3): exp of the entropy
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)


def test_numerical_rank_threshold():
    assert DEFAULT_RTOL == 1e-2
    assert numerical_rank(torch.eye(20)) == 20
    singular = torch.diag(torch.tensor([1.0, 0.5, 0.02, 0.005], dtype=torch.float64))
    assert numerical_rank(singular) == 3
    assert numerical_rank(singular, rtol=0.1) == 2
    assert numerical_rank(singular, rtol=1e-3) == 4
    assert numerical_rank(torch.zeros(3, 4)) == 0


def test_rank_functions_reject_bad_input():
    with pytest.raises(InputError, match="zero matrix"):
        effective_rank(torch.zeros(3, 3))
    with pytest.raises(InputError, match="2-D"):
        effective_rank(torch.ones(3))
    with pytest.raises(InputError, match="NaN"):
        numerical_rank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ParameterError, match="rtol"):
        numerical_rank(torch.eye(2), rtol=0)


class EmbeddingLM(torch.nn.Module):
    """A stand-in causal LM whose one "decoder block" passes the token embedding through unchanged:
    its activations are exactly the rows of the embedding, so features can be constructed."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding.from_pretrained(embedding)
        self.model.layers = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, input_ids, attention_mask=None):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return h


def _features(n_tokens: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, 2d] with orthonormal columns orthogonal to the all-ones vector: two models' features that are
    exactly centered, uncorrelated with each other, and isotropic."""
    a = torch.randn(n_tokens, 2 * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = a - a.mean(0)
    q, _ = torch.linalg.qr(a)
    return q * math.sqrt(n_tokens)


def _stats(embedding: torch.Tensor, n_tokens: int):
    ids = torch.arange(n_tokens).reshape(8, -1)  # every token once, 8 sequences
    return capture_activations(EmbeddingLM(embedding.float()), ids, batch_size=3, bootstrap_groups=4)


def test_averaging_two_models_with_independent_features_halves_the_variance():
    n, d = 64, 6
    q = _features(n, d)
    a, b = q[:, :d], q[:, d:]
    ratios = collapse_ratios(_stats((a + b) / 2, n), [_stats(a, n), _stats(b, n)], draws=0)
    point = ratios.set_index("metric")["point"]
    assert point["variance_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert point["effective_rank_ratio"] == pytest.approx(1.0, rel=1e-5)  # isotropic before and after
    assert point["numerical_rank_ratio"] == 1.0


def test_cancelling_features_collapse_the_rank():
    """Model b agrees with a on the first half of the units and is its negative on the second half:
    the average keeps half the directions, so variance and both ranks halve."""
    n, d = 64, 6
    a = _features(n, d)[:, :d]
    b = torch.cat([a[:, : d // 2], -a[:, d // 2 :]], dim=1)
    merged = _stats((a + b) / 2, n)
    metrics = collapse_metrics(merged, draws=0).set_index("metric")["point"]
    assert metrics["effective_rank"] == pytest.approx(d / 2, rel=1e-4)
    assert metrics["numerical_rank"] == d / 2
    point = collapse_ratios(merged, {"a": _stats(a, n), "b": _stats(b, n)}, draws=0).set_index("metric")["point"]
    assert point["variance_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert point["effective_rank_ratio"] == pytest.approx(0.5, rel=1e-4)
    assert point["numerical_rank_ratio"] == 0.5


def test_bootstrap_draw_is_the_covariance_of_the_resampled_tokens():
    n, d = 64, 6
    features = _features(n, d, seed=3)[:, :d] + torch.linspace(-2, 5, d)  # not centered
    stats = _stats(features, n)  # 8 sequences of 8 tokens in 4 groups of 2 sequences
    counts = torch.tensor([[2.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    tokens = torch.cat([features[0:16], features[0:16], features[32:48], features[48:64]])
    expected = torch.cov(tokens.T, correction=0)
    assert torch.allclose(stats.covariances("residual", 0, counts)[0].double(), expected, atol=1e-5)
    assert torch.allclose(stats.means("residual", counts)[0, 0], tokens.mean(0), atol=1e-6)


def test_bootstrap_counts_and_summary_columns():
    counts = bootstrap_counts(5, 50, seed=7)
    assert counts.shape == (51, 5)
    assert torch.equal(counts[0], torch.ones(5, dtype=torch.float64))
    assert torch.equal(counts.sum(1), torch.full((51,), 5.0, dtype=torch.float64))
    assert torch.equal(counts, bootstrap_counts(5, 50, seed=7))
    assert not torch.equal(counts, bootstrap_counts(5, 50, seed=8))

    n, d = 64, 6
    stats = _stats(_features(n, d, seed=1)[:, :d] * torch.linspace(0.1, 3, d), n)
    table = collapse_metrics(stats, model="m", draws=30, seed=1)
    assert list(table.columns) == ["model", "site", "layer", "metric", "mean", "std", "point", "draws"]
    assert set(table["metric"]) == {"variance", "effective_rank", "numerical_rank"}
    row = table.set_index("metric").loc["variance"]
    assert row["draws"] == 30 and row["std"] > 0
    values = torch.linspace(0.1, 3, d, dtype=torch.float64) ** 2
    assert row["point"] == pytest.approx(float(values.mean()), rel=1e-5)
    # a model against itself: every paired draw gives ratio 1 exactly
    same = collapse_ratios(stats, [stats], draws=10)
    assert (same["mean"] == 1.0).all() and (same["std"] == 0.0).all()


def test_collapse_ratios_reject_mismatched_inputs():
    n, d = 64, 6
    a = _stats(_features(n, d)[:, :d], n)
    other = capture_activations(EmbeddingLM(_features(n, d)[:, :d].float()), torch.arange(n).reshape(8, -1), bootstrap_groups=2)
    with pytest.raises(InputError, match="same probes"):
        collapse_ratios(a, [other], draws=0)
    with pytest.raises(WeightError):
        collapse_ratios(a, [a, a], weights=[1.0, -1.0], draws=0)
    with pytest.raises(ParameterError, match="not captured"):
        collapse_metrics(a, sites=["mlp"], draws=0)


def test_batched_eigvalsh_splits_the_batch_over_threads():
    a = torch.randn(7, 12, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    matrices = a @ a.mT
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        values = batched_eigvalsh(matrices)
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(values, torch.linalg.eigvalsh(matrices), atol=1e-10)


def _reference_metrics(features: torch.Tensor, weights: torch.Tensor) -> list[float]:
    """float64 variance, effective rank and numerical rank of the token-weighted covariance."""
    mean = weights @ features / weights.sum()
    cov = ((features - mean) * weights[:, None]).T @ (features - mean) / weights.sum()
    s = torch.linalg.eigvalsh(cov).clamp_min(0).sqrt()
    s = s[s > 1e-6 * s.max()]  # exact zeros (rank ≤ tokens − 1) in float64 rounding
    p = s / s.sum()
    return [float(cov.trace() / features.shape[1]), float(torch.exp(-(p * p.log()).sum())),
            float((s > DEFAULT_RTOL * s.max()).sum())]


@pytest.mark.parametrize("n, d", [(64, 96), (64, 6)])  # fewer tokens than units (the default keeps them), and more
def test_kept_tokens_give_the_same_statistics_and_metrics_as_the_second_moments(n, d):
    """Keeping the tokens (the n×n Gram side) and keeping Σ x xᵀ per group (the d×d side) are two exact
    representations: same covariances and means for every bootstrap draw, and metrics that match a
    float64 recomputation from the resampled tokens. Both spectra are float32: each exactly-zero
    eigenvalue comes out as noise of ~1e-7 λ_max, a singular value ~3e-4 σ_max in the effective rank.
    The Gram side has one (the centering's), the d×d side d − n + 1 more when n < d."""
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    features = features * torch.linspace(0.1, 3.0, d) + torch.linspace(-2, 5, d)  # anisotropic, not centered
    ids = torch.arange(n).reshape(8, -1)
    model = EmbeddingLM(features.float())
    moments = capture_activations(model, ids, batch_size=3, bootstrap_groups=4, keep_tokens=False)
    tokens = capture_activations(model, ids, batch_size=3, bootstrap_groups=4, keep_tokens=None if n < d else True)
    assert moments.tokens is None and moments.outer is not None
    assert tokens.outer is None and tokens.tokens["residual"].shape == (1, n, d)
    counts = bootstrap_counts(4, 6, seed=2)
    assert torch.allclose(tokens.covariances("residual", 0, counts), moments.covariances("residual", 0, counts),
                          atol=1e-5, rtol=1e-5)
    assert torch.allclose(tokens.means("residual", counts), moments.means("residual", counts), atol=1e-6)
    token_weights = counts[:, torch.arange(8) * 4 // 8].repeat_interleave(n // 8, dim=1)  # [draws + 1, n]
    expected = torch.tensor([_reference_metrics(features, w) for w in token_weights], dtype=torch.float64)
    by_tokens, by_moments = layer_metrics(tokens, "residual", counts)[0], layer_metrics(moments, "residual", counts)[0]
    for values, erank_tolerance in ((by_tokens, 5e-4), (by_moments, 5e-3 if n < d else 5e-4)):
        assert torch.allclose(values[:, [0, 2]], expected[:, [0, 2]], rtol=1e-5)
        assert torch.allclose(values[:, 1], expected[:, 1], rtol=erank_tolerance)
    if n < d:  # the token side is the closer one
        assert (by_tokens[:, 1] - expected[:, 1]).abs().max() < (by_moments[:, 1] - expected[:, 1]).abs().max()
    assert METRICS == ("variance", "effective_rank", "numerical_rank")
