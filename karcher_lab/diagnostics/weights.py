"""Weight-space metrics per tensor: norm shrinkage, angles between experts, the chord-versus-geodesic gap,
and the distance from the merged model to each expert.

Models are given opened: ``{name: tensor}`` state dicts, in-memory models (anything with
``state_dict()``, e.g. transformers models) or :mod:`karcher_lab.io` sources
(:class:`~karcher_lab.io.checkpoint.Checkpoint` for a checkpoint directory, read lazily;
:func:`karcher_lab.pipeline.open_model` opens paths and cached hub ids); a path is refused. They must
share one architecture (:func:`karcher_lab.io.architecture.check_layout`). Tensors are read one at a
time and every quantity comes from one float64 Gram pass
(:func:`karcher_lab.geometry.karcher_mean.gram_matrix`) over the experts x_1 … x_N and the merged
tensor x*, with n_i = ‖x_i‖, u_i = x_i/n_i and weights α normalized to sum 1 (equal by default):

- ``norm_ratio`` = ‖x*‖ / Σ_i α_i n_i: below 1 is norm shrinkage (a linear merge of equal-norm,
  non-parallel experts shrinks; karcher keeps the mean norm by construction, §3.4).
- ``angle_deg`` (pairwise, ``model`` × ``other``) = ∠(x_i, x_j) in degrees; with a base θ_0 also
  ``task_vector_angle_deg`` = ∠(x_i − θ_0, x_j − θ_0).
- the chord-versus-geodesic gap, for the directions u_i that karcher averages: ``chord_radius`` =
  ‖Σ_i α_i u_i‖ (1 when the experts are parallel; 1 − it is the norm a chord average of the directions
  loses), and ``chord_geodesic_angle_deg`` = the angle between the chord mean Σ α_i u_i and the
  spherical Karcher mean (0 for two experts with equal weights; it grows with the spread and
  the asymmetry of the experts). With a base the same two for the task vectors
  (``task_vector_chord_radius``, ``task_vector_chord_geodesic_angle_deg``). NaN where the Karcher mean
  is not unique (antipodal directions).
- per expert (``other``): ``relative_distance`` = ‖x* − x_i‖ / ‖x_i‖ and ``angle_deg`` = ∠(x*, x_i).

``norm_only=True`` gives the ``norm_ratio`` rows alone, from N + 1 float64 norms per tensor instead of the
(N + 1)² Gram, the chord gap's Karcher solve and the per-expert rows. A panel that redraws them on every
merge computes each expert's norms once (:func:`tensor_norms`) and only the merged model's per update
(:func:`norm_ratios`).

Tables are tidy: one row per tensor × metric (× expert or pair) with columns ``model``, ``other``,
``tensor``, ``layer`` (the decoder block index, :func:`karcher_lab.io.architecture.layer_index`; NA for
embeddings, final norm and head), ``metric``, ``mean`` (the value) and ``std`` (NaN: one value per
tensor). :func:`layer_summary` averages them per layer, with the std over the layer's tensors.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from karcher_lab.checks import check_weights
from karcher_lab.errors import AntipodalError, EmptyInputError, InputError, ParameterError
from karcher_lab.geometry.karcher_mean import block_norms, gram_matrix, karcher_coefficients
from karcher_lab.io.architecture import check_layout, layer_index
from karcher_lab.io.checkpoint import Checkpoint, StateDictSource

COLUMNS = ["model", "other", "tensor", "layer", "metric", "mean", "std"]


def _source(model: Any, label: str) -> Checkpoint | StateDictSource:
    """``model`` as a source: a Checkpoint or StateDictSource as it is, a state dict or model wrapped."""
    if isinstance(model, (Checkpoint, StateDictSource)):
        return model
    if isinstance(model, (str, os.PathLike)):
        raise InputError(f"model {label} is given as the path {str(model)!r}; weight metrics take opened models: "
                         "open it first, e.g. karcher_lab.io.Checkpoint(path) or karcher_lab.pipeline.open_model(path)")
    return StateDictSource(model, label)


def _open(models: Sequence[Any], labels: Sequence[str]):
    sources = [_source(m, label) for m, label in zip(models, labels)]
    return sources, check_layout(sources)


def _labels(names: Sequence[str] | None, n: int, prefix: str) -> list[str]:
    labels = list(names) if names is not None else [f"{prefix}_{i}" for i in range(n)]
    if len(labels) != n or len(set(labels)) != n:
        raise ParameterError(f"need {n} distinct model names, got {labels}")
    return labels


def _angles_deg(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise angles in degrees from a Gram matrix [N, N] (NaN where a norm is zero)."""
    norms = block_norms(gram.unsqueeze(0))[0]
    cos = gram / (norms[:, None] * norms[None, :])
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def _chord_gap(gram: torch.Tensor, alpha: torch.Tensor) -> tuple[float, float]:
    """(‖Σ α_i u_i‖, ∠(Σ α_i u_i, Karcher mean) in degrees) from the raw Gram [N, N]; NaN, NaN when
    nothing has a direction and NaN for the angle when the Karcher mean is not unique."""
    norms = block_norms(gram.unsqueeze(0))[0]
    chord = torch.where(norms > 0, alpha / torch.where(norms > 0, norms, 1.0), 0.0)  # Σ α_i u_i on raw tensors
    if not bool((chord != 0).any()):
        return float("nan"), float("nan")
    radius = math.sqrt(max(float(chord @ gram @ chord), 0.0))
    try:
        karcher, _ = karcher_coefficients(gram, alpha)
    except AntipodalError:
        return radius, float("nan")
    karcher = karcher[0]
    cos = float(chord @ gram @ karcher) / (radius * math.sqrt(max(float(karcher @ gram @ karcher), 0.0)))
    return radius, math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def _row(model, other, tensor, metric, value) -> dict:
    return dict(model=model, other=other, tensor=tensor, layer=layer_index(tensor), metric=metric,
                mean=float(value), std=float("nan"))


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def _pair_rows(labels: list[str], tensor: str, metric: str, angles: torch.Tensor) -> list[dict]:
    n = len(labels)
    return [_row(labels[i], labels[j], tensor, metric, angles[i, j]) for i in range(n) for j in range(i + 1, n)]


def expert_angles(experts: Sequence[Any], *, base: Any = None, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Pairwise angles between the experts per tensor (``angle_deg``), and between their task vectors
    (``task_vector_angle_deg``) when a ``base`` is given; one row per tensor × pair (i < j)."""
    if len(experts) < 2:
        raise EmptyInputError(f"pairwise angles need at least two experts, got {len(experts)}")
    labels = _labels(names, len(experts), "expert")
    extra = [base] if base is not None else []
    sources, layout = _open([*experts, *extra], [*labels, *["base"] * len(extra)])
    rows = []
    for name in layout.names:
        tensors = [s.load(stored[name]) for s, stored in zip(sources, layout.stored_names)]
        if not tensors[0].is_floating_point():
            continue
        rows += _pair_rows(labels, name, "angle_deg", _angles_deg(gram_matrix(tensors[: len(labels)])[0]))
        if base is not None:
            task_gram = gram_matrix(tensors[: len(labels)], center=tensors[-1])[0]
            rows += _pair_rows(labels, name, "task_vector_angle_deg", _angles_deg(task_gram))
    return _frame(rows)


def weight_metrics(
    merged: Any,
    experts: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    base: Any = None,
    merged_name: str = "merged",
    names: Sequence[str] | None = None,
    norm_only: bool = False,
) -> pd.DataFrame:
    """Per tensor: ``norm_ratio``, ``chord_radius``, ``chord_geodesic_angle_deg`` (and their task-vector
    versions with a ``base``), and per expert ``relative_distance`` and ``angle_deg`` from the merged
    model. ``weights``: the merge weights α (normalized; equal by default). ``norm_only``: the
    ``norm_ratio`` rows alone, from the tensors' norms (no Gram; ``base`` is then not allowed)."""
    if not experts:
        raise EmptyInputError("no experts given")
    if norm_only and base is not None:
        raise ParameterError("norm_only gives norm ratios only, which do not use a base: drop base or norm_only")
    labels = _labels(names, len(experts), "expert")
    alpha = check_weights(weights, len(experts), normalize=True, what="experts")
    extra = [base] if base is not None else []
    sources, layout = _open([*experts, merged, *extra], [*labels, merged_name, *["base"] * len(extra)])
    n = len(experts)
    rows = []
    if norm_only:
        norms = [{} for _ in range(n + 1)]  # the experts', then the merged model's
        for name in layout.names:
            tensors = [s.load(stored[name]) for s, stored in zip(sources, layout.stored_names)]  # no base here
            if tensors[0].is_floating_point():
                for model_norms, t in zip(norms, tensors):
                    model_norms[name] = _norm(t)
        return norm_ratios(norms[n], norms[:n], weights=alpha, merged_name=merged_name)
    for name in layout.names:
        tensors = [s.load(stored[name]) for s, stored in zip(sources, layout.stored_names)]
        if not tensors[0].is_floating_point():
            continue
        gram = gram_matrix(tensors[: n + 1])[0]  # experts and the merged tensor
        norms = block_norms(gram.unsqueeze(0))[0]
        rows.append(_row(merged_name, None, name, "norm_ratio", norms[n] / (alpha @ norms[:n])))
        radius, angle = _chord_gap(gram[:n, :n], alpha)
        rows += [_row(merged_name, None, name, "chord_radius", radius),
                 _row(merged_name, None, name, "chord_geodesic_angle_deg", angle)]
        if base is not None:
            radius, angle = _chord_gap(gram_matrix(tensors[:n], center=tensors[-1])[0], alpha)
            rows += [_row(merged_name, None, name, "task_vector_chord_radius", radius),
                     _row(merged_name, None, name, "task_vector_chord_geodesic_angle_deg", angle)]
        to_merged = _angles_deg(gram)[n]
        for i, label in enumerate(labels):
            distance = (gram[n, n] - 2 * gram[n, i] + gram[i, i]).clamp_min(0).sqrt() / norms[i]
            rows += [_row(merged_name, label, name, "relative_distance", distance),
                     _row(merged_name, label, name, "angle_deg", to_merged[i])]
    return _frame(rows)


NORM_CHUNK = 1 << 22
"""Elements widened at a time by :func:`_norm` (a float64 copy of a whole embedding would double its memory)."""
NORM_RUN = 1024
"""Squares summed in float32 per run by :func:`_norm` before the runs are added in float64."""


def _norm(tensor: torch.Tensor) -> float:
    """‖x‖₂ = √Σ x², chunk by chunk (:data:`NORM_CHUNK` elements). float64 tensors are summed in float64;
    narrower ones square in float32 (exact for bf16/fp16 values) and sum runs of :data:`NORM_RUN` squares
    in float32, the run sums in float64: a relative error of ~1e-8 (float32 rounding of each run's sum,
    averaging out over the runs) at a fraction of a float64 pass's cost."""
    flat = tensor.detach().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), NORM_CHUNK):
        chunk = flat[start:start + NORM_CHUNK]
        whole = 0 if chunk.dtype == torch.float64 else chunk.numel() // NORM_RUN * NORM_RUN
        if whole:
            total += float(chunk[:whole].float().view(-1, NORM_RUN).square().sum(1).sum(dtype=torch.float64))
        total += float(chunk[whole:].double().square().sum())
    return math.sqrt(total)


def tensor_norms(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖x‖₂ (accumulated in float64) of every floating-point tensor of a state dict, by name."""
    return {name: _norm(t) for name, t in state.items() if t.is_floating_point()}


def norm_ratios(
    merged_norms: Mapping[str, float],
    expert_norms: Sequence[Mapping[str, float]],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    merged_name: str = "merged",
) -> pd.DataFrame:
    """``norm_ratio`` rows, ‖x*‖ / Σ_i α_i ‖x_i‖ per tensor of ``merged_norms``, from norms computed
    beforehand (:func:`tensor_norms`): e.g. the experts' once, the merged model's per merge. Every
    expert must have a norm for each tensor of the merged model (ParameterError naming one that does not)."""
    if not expert_norms:
        raise EmptyInputError("no experts given")
    alpha = check_weights(weights, len(expert_norms), normalize=True, what="experts")
    rows = []
    for name, merged in merged_norms.items():
        missing = [i for i, norms in enumerate(expert_norms) if name not in norms]
        if missing:
            raise ParameterError(f"no norm of tensor {name!r} for expert(s) {missing}")
        experts = torch.tensor([norms[name] for norms in expert_norms], dtype=torch.float64)
        rows.append(_row(merged_name, None, name, "norm_ratio", merged / (alpha @ experts)))
    return _frame(rows)


def layer_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per-tensor rows averaged per layer (NA: tensors outside the decoder blocks): ``mean`` over the
    layer's tensors, ``std`` over them, and ``tensors`` (how many)."""
    grouped = table.groupby(["model", "other", "layer", "metric"], dropna=False, sort=True)["mean"]
    summary = grouped.agg(mean="mean", std="std", tensors="count").reset_index()
    return summary[["model", "other", "layer", "metric", "mean", "std", "tensors"]]
