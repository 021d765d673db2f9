"""Each expert's distance from the base in weight space: what orders the experts near and far when they
carry no heterogeneity level (a :class:`~karcher_lab.study.Study`, or a pool when asked).

All floating-point tensors of a model, taken together, form one vector θ. Against a reference θ_ref,
the base θ_0 or, without a base, the experts' mean θ̄ = (1/n) Σ_j θ_j:

- ``norm`` (the default): ‖θ_i − θ_ref‖ / ‖θ_ref‖, the size of the expert's task vector relative to the
  base's weights;
- ``angle``: ∠(θ_i, θ_ref) in degrees.

Near is the smallest first. The models are :mod:`karcher_lab.io` sources
(:class:`~karcher_lab.io.Checkpoint` reads lazily from disk, :class:`~karcher_lab.io.StateDictSource`
wraps a model in memory), read one tensor at a time, matched by their shared layout
(:func:`~karcher_lab.io.check_layout`: a tied head is read as its embedding), each tensor cast to
float64 and folded into running sums: no model is copied, and at most one tensor per model (two without
a base, which first sums the experts' tensor into the mean) is in memory at once.
"""
from __future__ import annotations

import math
from typing import Mapping

import pandas as pd
import torch

from karcher_lab.errors import EmptyInputError, ZeroNormError
from karcher_lab.io import Source, check_layout

DISTANCES = ("norm", "angle")
"""The geometric measures, by name (module docstring)."""


def describe(measure: str, has_base: bool) -> str:
    """A sentence fragment saying what ``measure`` (``norm`` or ``angle``) is, against the base or
    (``has_base`` false) the experts' mean."""
    ref, what = ("θ_0", "the base") if has_base else ("θ̄", "the experts' mean")
    if measure == "norm":
        return f"relative task-vector norm ‖θ_i − {ref}‖ / ‖{ref}‖ ({ref}: {what})"
    return f"angle ∠(θ_i, {ref}) to {what}"


def reference_distances(experts: Mapping[str, Source], base: Source | None = None) -> pd.DataFrame:
    """Every expert's ``norm`` and ``angle`` distance from the base (or the experts' mean).

    Parameters
    ----------
    experts : mapping of str to Source
        The experts by name, opened (:class:`~karcher_lab.io.Checkpoint`,
        :class:`~karcher_lab.io.StateDictSource`).
    base : Source, optional
        The base θ_0; without one the reference is the experts' mean.

    Returns
    -------
    DataFrame
        Indexed by expert (in the given order), columns ``norm`` (‖θ_i − θ_ref‖ / ‖θ_ref‖) and ``angle``
        (∠(θ_i, θ_ref) in degrees), over every floating-point tensor, sums in float64.

    Raises
    ------
    EmptyInputError
        No experts.
    ArchitectureMismatchError
        The models do not share one architecture (:func:`~karcher_lab.io.check_layout`).
    ZeroNormError
        The reference is all zeros, so neither distance is defined.
    """
    if not experts:
        raise EmptyInputError("no experts given: distances need at least one expert")
    names = list(experts)
    sources = [*experts.values(), *([] if base is None else [base])]
    layout = check_layout(sources)
    n = len(names)
    task_sq, dot, own_sq = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    reference_sq = torch.zeros((), dtype=torch.float64)

    for name in layout.names:
        stored = [names_of[name] for names_of in layout.stored_names]
        if not sources[0].tensors[stored[0]].dtype.is_floating_point:
            continue

        def read(i: int) -> torch.Tensor:
            return sources[i].load(stored[i]).to(torch.float64).reshape(-1)

        if base is None:
            reference = torch.zeros(math.prod(layout.shapes[name]), dtype=torch.float64)
            for i in range(n):
                reference += read(i)
            reference /= n
        else:
            reference = read(n)
        reference_sq += reference @ reference
        for i in range(n):
            x = read(i)
            task_sq[i] += (x - reference).square().sum()
            dot[i] += x @ reference
            own_sq[i] += x @ x
    if reference_sq <= 0:
        raise ZeroNormError(f"the {'base' if base is not None else 'mean of the experts'} has zero norm: "
                            "distances relative to it are undefined")
    reference_norm = reference_sq.sqrt()
    cosine = dot / (own_sq.sqrt() * reference_norm)
    return pd.DataFrame({"norm": (task_sq.sqrt() / reference_norm).tolist(),
                         "angle": torch.rad2deg(torch.arccos(cosine.clamp(-1, 1))).tolist()},
                        index=pd.Index(names, name="expert"))
