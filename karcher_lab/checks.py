"""Input checks shared by every layer: weights, model counts, solver parameters, counts, labels, devices.

Each check raises a specific :mod:`karcher_lab.errors` exception before any work is done, and names
the tensor (``name``) or the caller (``label``) when given. Nothing here knows models or files.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from karcher_lab.errors import DeviceError, EmptyInputError, ModelCountError, ParameterError, StepSizeError, WeightError


def where(name: str | None) -> str:
    """The prefix ``"tensor 'name': "`` that error messages about one tensor start with ("" for None)."""
    return f"tensor {name!r}: " if name else ""


def check_weights(
    weights: Sequence[float] | torch.Tensor | None,
    n: int,
    *,
    label: str = "",
    nonnegative: bool = True,
    normalize: bool = False,
    nonzero: bool = True,
    what: str = "models",
) -> torch.Tensor:
    """Per-item weights w as float64 ``[n]`` on the CPU, checked.

    Parameters
    ----------
    weights : sequence of float, tensor of shape [n], or None
        None means equal weights (1 each, or 1/n with ``normalize``).
    n : int
        Number of items (models, points, distributions); ``EmptyInputError`` when 0.
    label : str
        Prefix of every error message (e.g. ``"tensor 'w': karcher: "``).
    nonnegative : bool
        Refuse negative entries (convex combinations); False for task-arithmetic-style methods.
    normalize : bool
        Return α = w / Σ w.
    nonzero : bool
        Refuse all-zero weights (False for methods that ignore the weights).
    what : str
        What the items are called in messages.

    Returns
    -------
    w : torch.Tensor, float64 [n]
        ``WeightError`` unless of length n, finite, ≥ 0 (when ``nonnegative``) and not all zero
        (with ``normalize``: with a positive sum).
    """
    if n == 0:
        raise EmptyInputError(f"{label}no {what} given")
    if weights is None:
        return torch.full((n,), 1.0 / n if normalize else 1.0, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
    if w.numel() != n:
        raise WeightError(f"{label}got {w.numel()} weights for {n} {what}")
    if not bool(torch.isfinite(w).all()):
        raise WeightError(f"{label}weights must be finite, got {w.tolist()}")
    if nonnegative and bool((w < 0).any()):
        raise WeightError(f"{label}weights must be non-negative, got {w.tolist()}")
    if nonzero and bool((w == 0).all()):
        raise WeightError(f"{label}all weights are zero")
    if normalize:
        total = float(w.sum())
        if not total > 0:
            raise WeightError(f"{label}weights must have a positive sum, got {w.tolist()}")
        return w / total
    return w


def count_rule(min_models: int, max_models: int | None) -> str:
    """``"exactly 2"``, ``"at least 1"`` or ``"at least 2 and at most 3"``."""
    if min_models == max_models:
        return f"exactly {min_models}"
    return f"at least {min_models}" + (f" and at most {max_models}" if max_models is not None else "")


def check_model_count(
    n: int, min_models: int, max_models: int | None, *, label: str, what: str = "models", given: str = "got"
) -> None:
    """ModelCountError unless ``min_models ≤ n ≤ max_models``: ``"{label} merges {rule} {what}, {given} n"``."""
    if n < min_models or (max_models is not None and n > max_models):
        raise ModelCountError(f"{label} merges {count_rule(min_models, max_models)} {what}, {given} {n}")


def check_members(members: Sequence[int], count: int, what: str = "expert", *, weights: Sequence[Any] | None = None,
                  label: str = "") -> list[int]:
    """``members`` as a list of distinct indices into ``count`` items (the ``what``'s of a merge): EmptyInputError
    when empty, ParameterError for an index out of range (or no int) or given twice, or for ``weights`` (when
    given) not one per member (``label``: the method, for the message)."""
    members = list(members)
    if not members:
        raise EmptyInputError(f"no {what} is selected: select at least one")
    bad = [i for i in members if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ParameterError(f"member indices {bad} are not in 0..{count - 1}")
    if len(set(members)) != len(members):
        raise ParameterError(f"members {members} name an {what} twice")
    if weights is not None and len(weights) != len(members):
        raise ParameterError(f"{label}: got {len(weights)} weights for {len(members)} members")
    return members


def check_step_size(eta: Any, equation: str = "eq. 5 of the Karcher paper") -> None:
    """StepSizeError unless η is a number in (0, 1]."""
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and 0.0 < eta <= 1.0):
        raise StepSizeError(f"step size eta must lie in (0, 1] ({equation}), got {eta!r}")


def check_solver_params(*, eta: Any, max_iter: Any, tol: Any, equation: str = "eq. 5 of the Karcher paper") -> None:
    """The fixed-point solvers' settings: StepSizeError unless 0 < η ≤ 1; ParameterError unless
    ``max_iter`` is an int ≥ 0 and ``tol`` a number ≥ 0."""
    check_step_size(eta, equation)
    check_count("max_iter", max_iter, 0)
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol >= 0.0):
        raise ParameterError(f"tol must be a non-negative number, got {tol!r}")


def check_count(name: str, value: Any, low: int = 1) -> int:
    """ParameterError unless ``value`` is an int (not a bool) ≥ ``low``; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParameterError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """ParameterError unless ``value`` is one of ``choices``; returns it."""
    if value not in choices:
        raise ParameterError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


def check_positive(name: str, value: Any) -> float:
    """ParameterError unless ``value`` is a number (not a bool) > 0; returns it."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
        raise ParameterError(f"{name} must be a positive number, got {value!r}")
    return value


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device; DeviceError for an unknown device, or when CUDA is requested but not available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was requested but CUDA is not available on this machine; use --device cpu")
    return dev
