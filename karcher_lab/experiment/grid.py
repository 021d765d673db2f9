"""The sweep's grid: which experts in which order, which methods at which m, with which parameters.

Everything here is checked before any model is loaded, so bad input fails at once with a specific error.
The experts come from a zoo pool or a study (:mod:`karcher_lab.experiment.subject`); a pool's experts
are named by their task, a study's by its own names.

- **Orders** (the heterogeneity knob of the experiment): ``pool`` (the experts in their given order:
  pool.json's, or the study file's), ``near`` (the experts closest to the base first), ``far`` (the
  farthest first), or an explicit comma-separated list of experts ``"units,dates,double"``. The first m
  experts of an order are merged at m.
- **Distance** (:data:`ORDER_DISTANCES`): what near and far are ordered by. ``level``: the zoo's
  heterogeneity level of each expert (pool.json); the default where every expert has one, so zoo pools
  order as they always have. ``norm``: the relative task-vector norm ‖θ_i − θ_0‖ / ‖θ_0‖, the default
  otherwise (a study); ``angle``: the angle ∠(θ_i, θ_0) to the base. Both come from the weights
  (:mod:`karcher_lab.experiment.distances`), against the experts' mean where there is no base; ties keep
  the given order.
- **Methods** come from the one registry (:mod:`karcher_lab.methods.registry`). Equal weights
  wᵢ = 1/m, as in the paper; methods that need a base get the pool's (or study's) base. Pair methods
  (:attr:`~karcher_lab.methods.registry.MergeMethod.pair`) apply at m = 2 only, the first expert in the
  place of the base: ``slerp`` at t = 0.5 between the two experts, ``arcee_fusion`` (mergekit's base +
  one model) with the second expert as the model. A method is
  skipped at the m where it does not apply (``model_stock`` needs m ≥ 2); asking for a method that
  applies at none of the requested m is an error.
- **Parameters** (:data:`DEFAULT_PARAMS`): mergekit's defaults, except density 0.5 for the sparsifying
  methods (mergekit's default density 1.0 drops nothing, which would make dare_linear and
  della_linear the plain mean of task vectors) and t = 0.5 for slerp (the paper's two-way SLERP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from karcher_lab.checks import check_choice
from karcher_lab.errors import ModelCountError, ParameterError
from karcher_lab.experiment.distances import DISTANCES, describe
from karcher_lab.experiment.subject import SweepSubject, sweep_subject
from karcher_lab.methods.registry import get_method
from karcher_lab.study import Study
from karcher_lab.zoo import Pool

DEFAULT_METHODS: tuple[str, ...] = (
    "linear", "slerp", "multislerp", "model_stock", "ties", "dare_linear", "dare_ties", "della_linear", "della",
    "sce", "arcee_fusion", "karcher",
)
"""The paper's baselines (§4.1, mergekit names) and karcher."""

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "slerp": {"t": 0.5},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "della_linear": {"density": 0.5},
    "della": {"density": 0.5},
}

NAMED_ORDERS = ("pool", "near", "far")
ORDER_DISTANCES = ("level", *DISTANCES)
"""What orders near and far (module docstring)."""


@dataclass(frozen=True)
class Cell:
    """One merge of the sweep: ``method`` on the first ``m`` experts of ``order`` (task names)."""

    order: str
    method: str
    tasks: tuple[str, ...]

    @property
    def m(self) -> int:
        return len(self.tasks)

    @property
    def experts(self) -> str:
        return "+".join(self.tasks)


@dataclass
class SweepGrid:
    """The checked grid: the subject (pool or study), each order's expert list, the methods, the m values,
    the parameters, and the distance near and far are ordered by (:data:`ORDER_DISTANCES`)."""

    subject: SweepSubject
    orders: dict[str, tuple[str, ...]]
    methods: tuple[str, ...]
    m_values: tuple[int, ...]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    distance: str = "level"

    def cells(self) -> list[Cell]:
        """Every applicable cell, order by order, m by m, method by method."""
        return [Cell(name, method, tasks[:m]) for name, tasks in self.orders.items() for m in self.m_values
                for method in self.methods if applies(method, m)]

    def tasks(self) -> tuple[str, ...]:
        """Every expert some cell merges, in first-use order."""
        return tuple(dict.fromkeys(t for tasks in self.orders.values() for t in tasks[: max(self.m_values)]))


def applies(method: str, m: int) -> bool:
    """Whether ``method`` merges m experts in the sweep (see the module docstring)."""
    spec = get_method(method)
    if spec.pair:
        return m == 2
    return m >= spec.min_models and (spec.max_models is None or m <= spec.max_models)


def order_distance(subject: SweepSubject, distance: str | None) -> str:
    """The distance near and far are ordered by.

    Parameters
    ----------
    subject : SweepSubject
    distance : {"level", "norm", "angle"} or None
        The distance asked for; None: ``level`` where every expert has one, else ``norm``.

    Returns
    -------
    str
        One of :data:`ORDER_DISTANCES`.

    Raises
    ------
    ParameterError
        An unknown distance, or ``level`` for experts without levels.
    """
    if distance is None:
        return "level" if subject.levels is not None else "norm"
    check_choice("distance", distance, ORDER_DISTANCES)
    if distance == "level" and subject.levels is None:
        raise ParameterError(f"distance 'level' needs each expert's heterogeneity level (zoo pools); {subject.label} "
                             f"has none: order near and far by {' or '.join(repr(d) for d in DISTANCES)} instead")
    return distance


def describe_distance(subject: SweepSubject, distance: str) -> str:
    """What ``distance`` (:data:`ORDER_DISTANCES`) measures on ``subject``, as a sentence fragment."""
    if distance == "level":
        return "the zoo's heterogeneity level of each expert (pool.json)"
    return describe(distance, subject.has_base)


def ranked(values: Mapping[str, float], far_first: bool) -> tuple[str, ...]:
    """The names of ``values`` by value, ascending (descending with ``far_first``), ties in the given order."""
    order = sorted(enumerate(values.items()), key=lambda item: ((-1 if far_first else 1) * item[1][1], item[0]))
    return tuple(name for _, (name, _) in order)


def explicit_order(subject: SweepSubject, order: str) -> tuple[str, ...]:
    """The experts of order ``pool`` or of a comma-separated list (see the module docstring).

    Raises
    ------
    ParameterError
        An empty list, an unknown expert or one named twice.
    """
    if order == "pool":
        return subject.experts
    tasks = tuple(t.strip() for t in order.split(",") if t.strip())
    unknown = [t for t in tasks if t not in subject.experts]
    if unknown or not tasks:
        raise ParameterError(f"order {order!r}: give one of {list(NAMED_ORDERS)} or a comma-separated list of the "
                             f"experts; unknown expert(s) {unknown}; {subject.label} has {list(subject.experts)}")
    if len(set(tasks)) != len(tasks):
        raise ParameterError(f"order {order!r} names an expert twice")
    return tasks


def closeness(subject: SweepSubject, distance: str) -> dict[str, float]:
    """Each expert's distance from the base under ``distance`` (the levels, or the weights' geometry)."""
    if distance == "level":
        return subject.levels
    return subject.distances[distance].to_dict()


def parse_m(values: Iterable[str | int]) -> tuple[int, ...]:
    """m values from integers, ``"2..11"`` ranges or ``"2,3,5"`` lists (sorted, unique)."""
    out: set[int] = set()
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            try:
                if ".." in part:
                    low, high = (int(x) for x in part.split(".."))
                    if low > high:
                        raise ValueError(part)
                    out.update(range(low, high + 1))
                elif part:
                    out.add(int(part))
            except ValueError:
                raise ParameterError(f"m: expected integers, lists like 2,3,5 or ranges like 2..11; got {value!r}") from None
    if not out:
        raise ParameterError("m: no values given")
    return tuple(sorted(out))


def make_grid(
    source: SweepSubject | Pool | Study | str,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    m_values: Iterable[str | int] = ("2..11",),
    orders: Sequence[str] = ("near", "far"),
    params: Mapping[str, Mapping[str, Any]] | None = None,
    distance: str | None = None,
) -> SweepGrid:
    """Check everything and return the grid.

    Parameters
    ----------
    source : Pool, Study or str
        A Pool, a pool name or directory, a Study or the path of a study YAML
        (:func:`~karcher_lab.experiment.subject.sweep_subject`).
    methods, m_values, orders, params
        See the module docstring; ``m_values`` as :func:`parse_m` reads them, ``params`` as
        {method: {parameter: value}} over :data:`DEFAULT_PARAMS`.
    distance : {"level", "norm", "angle"}, optional
        What near and far are ordered by (default: ``level`` where every expert has one, else ``norm``).

    Returns
    -------
    SweepGrid

    Every argument is checked, and the counts of experts against m, before any model is loaded; the
    distances of ``norm`` and ``angle`` orders are then read from the weights, one tensor at a time.
    """
    methods = tuple(dict.fromkeys(methods))
    if not methods:
        raise ParameterError("no methods given")
    for method in methods:
        get_method(method)  # UnknownMethodError listing the registered methods
    ms = parse_m(m_values)
    if not orders:
        raise ParameterError("no orders given")
    merged_params = {k: dict(v) for k, v in DEFAULT_PARAMS.items()}
    for method, extra in (params or {}).items():
        get_method(method)
        merged_params.setdefault(method, {}).update(extra)
    for method, values in merged_params.items():
        spec = get_method(method)
        for name, value in values.items():
            spec.param(name).coerce(value, method)
    subject = sweep_subject(source)
    distance = order_distance(subject, distance)
    orders = tuple(dict.fromkeys(orders))
    explicit = {order: explicit_order(subject, order) for order in orders if order not in ("near", "far")}
    shortest = min([len(t) for t in explicit.values()] + ([len(subject.experts)] if len(explicit) < len(orders) else []))
    if ms[0] < 1 or ms[-1] > shortest:
        raise ModelCountError(f"m must lie in 1..{shortest} (the number of experts in the shortest order; "
                              f"{subject.label} has {len(subject.experts)}), got {list(ms)}")
    idle = [method for method in methods if not any(applies(method, m) for m in ms)]
    if idle:
        raise ModelCountError(f"method(s) {idle} apply at none of m = {list(ms)} (slerp and arcee_fusion merge two "
                              f"models: m = 2; model_stock needs m >= 2)")
    resolved = {order: explicit[order] if order in explicit else ranked(closeness(subject, distance), order == "far")
                for order in orders}
    return SweepGrid(subject, resolved, methods, ms, {k: v for k, v in merged_params.items() if k in methods}, distance)
