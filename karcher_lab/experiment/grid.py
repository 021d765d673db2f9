"""The sweep's grid: which experts in which order, which methods at which m, with which parameters.

Everything here is checked before any model is loaded, so bad input fails at once with a specific error.

- **Orders** (the heterogeneity knob of the experiment): ``pool`` (the pool's own order), ``near``
  (ascending heterogeneity level: the experts closest to the base first), ``far`` (descending level),
  or an explicit comma-separated task list ``"units,dates,double"``. The first m experts of an order are
  merged at m.
- **Methods** come from the one registry (:mod:`karcher_lab.methods.registry`). Equal weights
  wᵢ = 1/m, as in the paper; methods that need a base get the pool's base. Pair methods
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

from karcher_lab.errors import ModelCountError, ParameterError
from karcher_lab.methods.registry import get_method
from karcher_lab.zoo import Pool, find_pool

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
    """The checked grid: the pool, each order's task list, the methods, the m values, the parameters."""

    pool: Pool
    orders: dict[str, tuple[str, ...]]
    methods: tuple[str, ...]
    m_values: tuple[int, ...]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every applicable cell, order by order, m by m, method by method."""
        return [Cell(name, method, tasks[:m]) for name, tasks in self.orders.items() for m in self.m_values
                for method in self.methods if applies(method, m)]

    def tasks(self) -> tuple[str, ...]:
        """Every task some cell merges, in first-use order."""
        return tuple(dict.fromkeys(t for tasks in self.orders.values() for t in tasks[: max(self.m_values)]))


def applies(method: str, m: int) -> bool:
    """Whether ``method`` merges m experts in the sweep (see the module docstring)."""
    spec = get_method(method)
    if spec.pair:
        return m == 2
    return m >= spec.min_models and (spec.max_models is None or m <= spec.max_models)


def resolve_pool(pool: Pool | str) -> Pool:
    """A :class:`Pool` from a Pool, a pool name (tiny, small, medium, ...) or a pool directory."""
    return pool if isinstance(pool, Pool) else find_pool(str(pool))


def level_order(pool: Pool, far_first: bool) -> tuple[str, ...]:
    """The pool's tasks by heterogeneity level (ties kept in pool order)."""
    experts = sorted(enumerate(pool.experts), key=lambda ie: ((-1 if far_first else 1) * ie[1].get("level", 0.0), ie[0]))
    return tuple(e["task"] for _, e in experts)


def resolve_order(pool: Pool, order: str) -> tuple[str, ...]:
    """The task list an order names (see the module docstring)."""
    if order == "pool":
        return tuple(e["task"] for e in pool.experts)
    if order in ("near", "far"):
        if any("level" not in e for e in pool.experts):
            raise ParameterError(f"order {order!r} needs each expert's heterogeneity level; pool {pool.name} has none")
        return level_order(pool, far_first=order == "far")
    tasks = tuple(t.strip() for t in order.split(",") if t.strip())
    known = [e["task"] for e in pool.experts]
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ParameterError(f"order {order!r}: give one of {list(NAMED_ORDERS)} or a comma-separated list of the "
                             f"pool's tasks; unknown task(s) {unknown}; pool {pool.name} has {known}")
    if len(set(tasks)) != len(tasks):
        raise ParameterError(f"order {order!r} names a task twice")
    return tasks


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
    pool: Pool | str,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    m_values: Iterable[str | int] = ("2..11",),
    orders: Sequence[str] = ("near", "far"),
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> SweepGrid:
    """Check everything and return the grid; raises before any model is loaded."""
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
    pool = resolve_pool(pool)
    resolved = {order: resolve_order(pool, order) for order in dict.fromkeys(orders)}
    shortest = min(len(t) for t in resolved.values())
    if ms[0] < 1 or ms[-1] > shortest:
        raise ModelCountError(f"m must lie in 1..{shortest} (the number of experts in the shortest order; pool "
                              f"{pool.name} has {len(pool.experts)}), got {list(ms)}")
    idle = [method for method in methods if not any(applies(method, m) for m in ms)]
    if idle:
        raise ModelCountError(f"method(s) {idle} apply at none of m = {list(ms)} (slerp and arcee_fusion merge two "
                              f"models: m = 2; model_stock needs m >= 2)")
    return SweepGrid(pool, resolved, methods, ms, {k: v for k, v in merged_params.items() if k in methods})
