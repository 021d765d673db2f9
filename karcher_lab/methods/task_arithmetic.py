"""The task-arithmetic family: mergekit's "generalized task arithmetic" (0.1.5), eight methods.

With θ0 the base, δi = θi − θ0 the task vectors, wi the per-model ``weight`` and λ ``lambda``:

1. trim each task vector on its own: δ̃i = trim(δi; ρi, …) (:mod:`karcher_lab.methods.sparsify`),
   optionally L1-rescaled (``rescale``);
2. weight it: xi = wi δ̃i;
3. without consensus: Δ = Σ xi, divisor D = Σ wi (|D| < 1e-8 → 1);
   with consensus (TIES "elect" + "disjoint merge", :mod:`karcher_lab.methods.consensus`):
   mi = [sign(xi) = sign(Σ xk)] (a zero sum counts as +), Δ = Σ mi xi, D = Σ wi mi (D = 0 → 1);
4. θ = θ0 + λ · (Δ / D if ``normalize`` else Δ).

======================  =================  =========  =================
method                  trim               consensus  normalize/rescale
======================  =================  =========  =================
task_arithmetic         none               no         false / false
ties                    magnitude top-k    yes        true / false
dare_linear             Bernoulli(ρ)       no         false / true
dare_ties               Bernoulli(ρ)       yes        false / true
della                   DELLA MagPrune     yes        true / true
della_linear            DELLA MagPrune     no         false / true
breadcrumbs             top γ + bottom     no         false / false
breadcrumbs_ties        top γ + bottom     yes        false / false
======================  =================  =========  =================

Papers: task arithmetic (Ilharco et al. 2022, arXiv:2212.04089, θ = θ0 + λ Σ τi); TIES (Yadav et
al. 2023, arXiv:2306.01708, Alg. 1); DARE (Yu et al. 2023, arXiv:2311.03099, eq. 2); DELLA (Deep et
al. 2024, arXiv:2406.11617, §3); Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795).

Parameters are mergekit's: global ``normalize``, ``rescale`` (per-method defaults above), ``lambda``
(1.0) and ``int8_mask`` (false; accepted for recipe compatibility — in mergekit it only stores the
sign mask as int8 to save memory and never changes the result, so it is ignored here); per-model
``density`` (1.0), ``gamma`` (0.01, breadcrumbs*) and ``epsilon`` (0.15, della*). ``density`` and
``rescale`` are accepted but unused by task_arithmetic, as in mergekit. The per-model weight is the
``weights`` argument (mergekit requires it; here it defaults to 1.0).

Weights may be negative in every method of the family, as in mergekit (which puts no bound on them):
the consensus is then elected on the signed products wi δ̃i, and with ``normalize`` the divisor
Σ wi mi is only replaced when exactly 0 (mergekit's rule), so mixed-sign weights can make it small.

Deviations from mergekit 0.1.5 (all only where mergekit fails or is ill-defined):

* parameter ranges are checked before any work: density, gamma ∈ [0, 1], epsilon ≥ 0 and, for della*,
  0 < ρ ± ε < 1 whenever 0 < ρ < 1 (mergekit accepts density > 1 as 1, negative density as 0 and a
  negative epsilon, which inverts DELLA's preference for large magnitudes);
* DELLA on a row of one entry uses p = ρ; mergekit divides 0/0 there and torch.bernoulli raises;
* equal magnitudes are ranked by the lower index (mergekit's sort order among ties is unspecified);
* computation is in float32 (float64 if any input is), where mergekit computes in the input dtype
  and, on CPU, applies the DARE/DELLA mask and rescale in float32 even for float64 inputs (the masks
  agree; float64 results differ from mergekit's by float32 rounding, ~1e-7). bf16 inputs give
  mergekit's result for ``dtype: float32`` (bit-identical, masks included), not its bf16 arithmetic.

Randomized methods (dare_*, della*) draw from the ``generator`` they are given, one model after the
other in input order, exactly as mergekit draws from torch's global RNG; the same seed gives
bit-identical output, and a generator seeded with s reproduces mergekit's masks for one tensor merged
right after ``torch.manual_seed(s)`` (mergekit keeps one stream across all tensors of a model, while
``merge_tensors`` reseeds per call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from karcher_lab.methods.consensus import sign_agreement_mask
from karcher_lab.methods.registry import Param, register
from karcher_lab.methods.sparsify import (
    breadcrumbs_prune,
    check_della_range,
    dare_drop,
    della_magprune,
    magnitude_prune,
)
from karcher_lab.methods.stacked import per_model

TASK_ARITHMETIC_DIVISOR_EPS = 1e-8
"""Without consensus, a normalizing divisor with |Σ wi| below this is replaced by 1 (mergekit)."""


def combine_task_vectors(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """θ0 + λ · Δ (/ D when ``normalize``) for trimmed task vectors ``deltas`` stacked on dimension 0.

    Steps 2–4 of the module docstring: xi = wi δ̃i; without consensus Δ = Σ xi, D = Σ wi
    (|D| < 1e-8 → 1); with consensus mi = [sign(xi) = sign(Σ xk)], Δ = Σ mi xi, D = Σ wi mi (0 → 1).
    The weights are cast to the deltas' dtype first, as in mergekit.
    """
    w = per_model(weights, deltas)
    weighted = deltas * w
    if consensus:
        agree = sign_agreement_mask(weighted)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < TASK_ARITHMETIC_DIVISOR_EPS, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    return base + mixed * scale


_Rng = torch.Generator | None
Trim = Callable[[torch.Tensor, dict[str, Any], bool, _Rng], torch.Tensor]
"""trim(δ, this model's per-model parameters, rescale, generator) -> δ̃."""


def _keep_all(delta: torch.Tensor, p: dict[str, Any], rescale: bool, generator: _Rng) -> torch.Tensor:
    return delta


def _trim_magnitude(delta: torch.Tensor, p: dict[str, Any], rescale: bool, generator: _Rng) -> torch.Tensor:
    return magnitude_prune(delta, p["density"], rescale=rescale)


def _trim_random(delta: torch.Tensor, p: dict[str, Any], rescale: bool, generator: _Rng) -> torch.Tensor:
    return dare_drop(delta, p["density"], rescale=rescale, generator=generator)


def _trim_della(delta: torch.Tensor, p: dict[str, Any], rescale: bool, generator: _Rng) -> torch.Tensor:
    return della_magprune(delta, p["density"], p["epsilon"], rescale=rescale, generator=generator)


def _trim_breadcrumbs(delta: torch.Tensor, p: dict[str, Any], rescale: bool, generator: _Rng) -> torch.Tensor:
    return breadcrumbs_prune(delta, p["density"], p["gamma"], rescale=rescale)


@dataclass(frozen=True)
class _Variant:
    name: str
    summary: str
    paper: str
    trim: Trim
    consensus: bool
    normalize: bool
    rescale: bool
    per_model_extra: tuple[Param, ...] = ()

    @property
    def randomized(self) -> bool:
        return self.trim in (_trim_random, _trim_della)


_GAMMA = Param(
    "gamma", float, 0.01, per_model=True, low=0.0, high=1.0,
    doc="fraction of largest-|δ| entries dropped as outliers (breadcrumbs)",
)
_EPSILON = Param(
    "epsilon", float, 0.15, per_model=True, low=0.0, high=1.0,
    doc="half-width of DELLA's keep probabilities ρ ± ε (needs 0 < ρ ± ε < 1)",
)

_VARIANTS = (
    _Variant("task_arithmetic", "θ0 + λ Σ wi (θi − θ0)", "Ilharco et al. 2022, arXiv:2212.04089",
             _keep_all, consensus=False, normalize=False, rescale=False),
    _Variant("ties", "TIES: magnitude top-k trim, sign election, disjoint mean",
             "Yadav et al. 2023, arXiv:2306.01708", _trim_magnitude, consensus=True, normalize=True, rescale=False),
    _Variant("dare_linear", "DARE: Bernoulli(ρ) drop with L1 rescale, then task arithmetic",
             "Yu et al. 2023, arXiv:2311.03099", _trim_random, consensus=False, normalize=False, rescale=True),
    _Variant("dare_ties", "DARE drop with L1 rescale, then TIES sign election",
             "Yu et al. 2023, arXiv:2311.03099", _trim_random, consensus=True, normalize=False, rescale=True),
    _Variant("della", "DELLA: rank-based drop probabilities ρ ± ε, L1 rescale, TIES sign election",
             "Deep et al. 2024, arXiv:2406.11617", _trim_della, consensus=True, normalize=True, rescale=True,
             per_model_extra=(_EPSILON,)),
    _Variant("della_linear", "DELLA drop with L1 rescale, then task arithmetic",
             "Deep et al. 2024, arXiv:2406.11617", _trim_della, consensus=False, normalize=False, rescale=True,
             per_model_extra=(_EPSILON,)),
    _Variant("breadcrumbs", "Model Breadcrumbs: drop top-γ outliers and the smallest |δ|, then task arithmetic",
             "Davari & Belilovsky 2023, arXiv:2312.06795", _trim_breadcrumbs, consensus=False, normalize=False,
             rescale=False, per_model_extra=(_GAMMA,)),
    _Variant("breadcrumbs_ties", "Model Breadcrumbs trim, then TIES sign election",
             "Davari & Belilovsky 2023, arXiv:2312.06795", _trim_breadcrumbs, consensus=True, normalize=False,
             rescale=False, per_model_extra=(_GAMMA,)),
)


def _params(variant: _Variant) -> tuple[Param, ...]:
    return (
        Param("int8_mask", bool, False, doc="accepted for mergekit compatibility; memory-only there, ignored"),
        Param("normalize", bool, variant.normalize, doc="divide by the (agreeing) weight sum"),
        Param("rescale", bool, variant.rescale, doc="L1-rescale each trimmed task vector to its original norm"),
        Param("lambda", float, 1.0, doc="scale of the merged task vector"),
        Param("density", float, 1.0, per_model=True, low=0.0, high=1.0, doc="fraction of each task vector kept"),
        *variant.per_model_extra,
    )


def _make_method(variant: _Variant) -> Callable[..., torch.Tensor]:
    per_model_names = ["density"] + [p.name for p in variant.per_model_extra]

    def merge(
        tensors: list[torch.Tensor],
        *,
        weights: torch.Tensor,
        base: torch.Tensor,
        generator: torch.Generator | None = None,
        name: str | None = None,
        **params: Any,
    ) -> torch.Tensor:
        per_model = [{key: params[key][i] for key in per_model_names} for i in range(len(tensors))]
        if _EPSILON in variant.per_model_extra:
            where = f"{variant.name}" + (f" (tensor {name!r})" if name else "")
            for i, p in enumerate(per_model):
                check_della_range(p["density"], p["epsilon"], where=f"{where}, model {i}")
        deltas = torch.stack(
            [variant.trim(t - base, per_model[i], params["rescale"], generator) for i, t in enumerate(tensors)]
        )
        return combine_task_vectors(
            base, deltas, weights,
            consensus=variant.consensus, normalize=params["normalize"], scale=params["lambda"],
        )

    merge.__name__ = merge.__qualname__ = variant.name
    merge.__doc__ = f"{variant.summary} ({variant.paper}); see the module docstring for the algorithm."
    return merge


for _variant in _VARIANTS:
    register(
        _variant.name,
        summary=_variant.summary,
        params=_params(_variant),
        base="required",
        weights="any",
        min_models=1,
        randomized=_variant.randomized,
        paper=_variant.paper,
    )(_make_method(_variant))
del _variant
