"""One registry of merge methods, shared by the Python API, the CLI, YAML recipes and the widgets.

A method is a pure function on tensors::

    fn(tensors, *, weights, base, generator, name, **params) -> Tensor | (Tensor, trace)

It receives already validated inputs (see :mod:`karcher_lab.merge.api`): ``tensors`` is a list of N
same-shape floating tensors in the compute dtype, ``weights`` a float64 tensor of shape [N] (the
per-model ``weight``; 1.0 each when the user gave none), ``base`` the base tensor or None, ``generator``
a seeded ``torch.Generator`` for randomized methods (None otherwise), ``name`` the tensor's name
(or None) for error messages, and ``params`` every declared
parameter with defaults filled in. Per-model parameters arrive as a list of N Python values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from karcher_lab.errors import ParameterError, UnknownMethodError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default marking a parameter the user must give (as mergekit's required parameters)."""


@dataclass(frozen=True)
class Param:
    """A method parameter, named as in mergekit's YAML.

    ``kind`` is the Python type values are coerced to (float, int, bool or str; ``object`` passes
    values such as per-model tensors through unchanged). ``per_model``
    parameters may be given as one value for all models or a sequence of N values. ``low``/``high``
    are inclusive bounds (None = unbounded) checked before any work; ``choices`` restricts strings.
    """

    name: str
    kind: type
    default: Any = REQUIRED
    per_model: bool = False
    doc: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None

    def coerce(self, value: Any, method: str) -> Any:
        """Convert one value to ``kind`` and check its bounds; raise ParameterError otherwise."""
        where = f"{method}: parameter {self.name!r}"
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    if value.lower() not in {"true", "false"}:
                        raise ValueError(value)
                    out: Any = value.lower() == "true"
                elif isinstance(value, (bool, int)) and value in (0, 1):
                    out = bool(value)
                else:
                    raise ValueError(value)
            elif self.kind is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError(value)
                out = int(float(value))
            elif self.kind is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                out = float(value)
            elif self.kind is object:
                out = value
            else:
                out = self.kind(value)
        except (TypeError, ValueError):
            raise ParameterError(f"{where} must be of type {self.kind.__name__}, got {value!r}") from None
        if self.kind in (int, float):
            if out != out or out in (float("inf"), float("-inf")):
                raise ParameterError(f"{where} must be finite, got {value!r}")
            if self.low is not None and out < self.low:
                raise ParameterError(f"{where} must be >= {self.low}, got {out}")
            if self.high is not None and out > self.high:
                raise ParameterError(f"{where} must be <= {self.high}, got {out}")
        if self.choices is not None and out not in self.choices:
            raise ParameterError(f"{where} must be one of {list(self.choices)}, got {out!r}")
        return out


BaseUse = Literal["required", "optional", "unused"]
WeightUse = Literal["nonnegative", "any", "unused"]


@dataclass(frozen=True)
class MergeMethod:
    """Registry entry: the function plus what it needs, so inputs can be checked before any work.

    base: whether a base tensor is required, optional (e.g. task-vector modes) or unused (ignored
    when given, as mergekit ignores ``base_model`` for such methods). weights: whether per-model
    weights must be non-negative, may be negative (task arithmetic) or are not used at all.
    checks_finite: the method itself raises NonFiniteError for NaN/Inf inputs, found in a pass over the
    data it makes anyway (karcher's Gram diagonal), so ``merge_tensors`` skips its own NaN/Inf pass.
    """

    name: str
    fn: Callable[..., Any]
    summary: str
    params: tuple[Param, ...] = ()
    base: BaseUse = "unused"
    weights: WeightUse = "nonnegative"
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    returns_trace: bool = False
    checks_finite: bool = False
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ParameterError(
            f"{self.name}: unknown parameter {name!r}; known: {[p.name for p in self.params] or 'none'}"
        )


_REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    summary: str,
    params: tuple[Param, ...] = (),
    base: BaseUse = "unused",
    weights: WeightUse = "nonnegative",
    min_models: int = 1,
    max_models: int | None = None,
    randomized: bool = False,
    returns_trace: bool = False,
    checks_finite: bool = False,
    paper: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as merge method ``name`` (names are mergekit's ``merge_method``)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            summary=summary,
            params=params,
            base=base,
            weights=weights,
            min_models=min_models,
            max_models=max_models,
            randomized=randomized,
            returns_trace=returns_trace,
            checks_finite=checks_finite,
            paper=paper,
        )
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; UnknownMethodError lists the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)
