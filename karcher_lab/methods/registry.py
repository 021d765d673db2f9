"""One registry of merge methods, shared by the Python API, the CLI, YAML recipes and the widgets.

A method is a pure function on tensors whose signature is its contract::

    fn(tensors, *, [weights], [base], [generator], [name], <one keyword per declared Param>)
        -> Tensor | (Tensor, trace)

It receives already validated inputs (see :mod:`karcher_lab.methods.api`), and of the context arguments
only those its signature names: ``tensors`` is a list of N same-shape floating tensors in the compute
dtype, ``weights`` a float64 tensor of shape [N] (the per-model ``weight``; 1.0 each when the user gave
none), ``base`` the base tensor or None, ``generator`` a seeded ``torch.Generator`` for randomized
methods (None otherwise), ``name`` the tensor's name (or None) for error messages. Every declared
parameter arrives with its default filled in; per-model parameters as a list of N Python values.
Registration checks that the keyword parameters of ``fn`` are exactly its declared parameters plus
context arguments (or, with ``**params``, a subset of them), so a method cannot silently ignore a
parameter it declares.

Adding a method: write the function in a module of this package, decorate it with
:func:`register` (its rules: :class:`MergeMethod`'s fields), and import the module in
``karcher_lab/methods/__init__.py``. Recipes, the CLI, the sweep and the widgets pick it up from here.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Generic, Literal, Mapping, TypeVar

from karcher_lab.checks import check_model_count
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
    ``slider``: (min, max, step) of the slider a panel shows for this parameter (e.g. karcher's η on
    [0.05, 1]), when it differs from the bounds or the parameter has none.
    """

    name: str
    kind: type
    default: Any = REQUIRED
    per_model: bool = False
    doc: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    slider: tuple[float, float, float] | None = None

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


Entry = TypeVar("Entry")

CONTEXT = ("weights", "base", "generator", "name")
"""Arguments every call provides; a method's function takes those it uses (keyword-only)."""

BaseUse = Literal["required", "optional", "first", "unused"]
WeightUse = Literal["nonnegative", "any", "unused"]


@dataclass(frozen=True)
class TwoPhase:
    """A method's two-phase form, for re-weighting without another pass over the data.

    ``prepare(tensors, *, base, name, **params) -> state`` does the weight-independent work (karcher:
    the Gram matrices, one read of the data); ``solve(state, tensors, *, weights, base, name, **params)``
    finishes the merge for any weights. ``prepared_by`` names the parameters the state depends on; a
    cached state is reused only while they (and the inputs) are unchanged.

    ``row_separable(params) -> bool`` (optional) says, for resolved parameters, that the merge can run
    on row slices (axis 0) of the inputs: the states ``prepare`` makes of the slices add up to the
    whole's, and ``solve`` given the whole's state and one slice returns that slice of the result
    (:func:`karcher_lab.methods.api.merge_tensors` with :class:`~karcher_lab.methods.api.RowSlices`).
    """

    prepare: Callable[..., Any]
    solve: Callable[..., Any]
    prepared_by: tuple[str, ...] = ()
    row_separable: Callable[[dict[str, Any]], bool] | None = None


@dataclass(frozen=True)
class MergeMethod:
    """Registry entry: the function plus every rule about its inputs, so callers never branch on a name.

    base: how ``base_model`` is used. ``required`` / ``optional`` (e.g. task-vector modes): it is the
    method's base tensor; ``first``: it is the method's first input (slerp interpolates from it);
    ``unused``: it is ignored by the method (a recipe then merges it as one more input, as mergekit
    does). base_mode: the boolean parameter that switches an optional base on (karcher's
    ``task_vectors``); without it an optional base is used whenever given. weights: whether per-model
    weights must be non-negative, may be negative (task arithmetic) or are not used at all.
    min_models / max_models: the number of inputs besides the base. checks_finite: the method itself
    raises NonFiniteError for NaN/Inf inputs, found in a pass over the data it makes anyway (karcher's
    Gram diagonal), so ``merge_tensors`` skips its own NaN/Inf pass. reads_narrow: the method takes
    bf16/fp16 inputs as they are and widens them chunk by chunk in its own passes (karcher's Gram and
    combine), so no float32 copy of every input is made; the others get float32 copies. two_phase: see
    :class:`TwoPhase`.
    """

    name: str
    fn: Callable[..., Any]
    summary: str
    params: tuple[Param, ...] = ()
    base: BaseUse = "unused"
    base_mode: str | None = None
    weights: WeightUse = "nonnegative"
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    returns_trace: bool = False
    checks_finite: bool = False
    reads_narrow: bool = False
    two_phase: TwoPhase | None = None
    paper: str = ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ParameterError(
            f"{self.name}: unknown parameter {name!r}; known: {[p.name for p in self.params] or 'none'}"
        )

    @cached_property
    def context(self) -> tuple[str, ...]:
        """The context arguments (:data:`CONTEXT`) that ``fn`` takes."""
        return tuple(a for a in CONTEXT if a in inspect.signature(self.fn).parameters)

    def call(self, tensors: list[Any], context: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
        """``fn(tensors, **context, **params)``, passing only the context arguments it takes."""
        return self.fn(tensors, **{k: context[k] for k in self.context}, **params)

    def uses_base(self, params: Mapping[str, Any] | None = None) -> bool:
        """Whether ``base_model`` reaches the method as its base (or first input) under ``params``."""
        if self.base == "unused":
            return False
        if self.base_mode is None:
            return True
        mode = self.param(self.base_mode)
        return bool(mode.coerce((params or {}).get(mode.name, mode.default), self.name))

    @property
    def pair(self) -> bool:
        """Whether the method merges exactly two models, one of which is its base (slerp from the first
        to the second; arcee_fusion and nearswap: a base and one model)."""
        if self.base == "first":
            return self.max_models == 2
        return self.base == "required" and self.max_models == 1

    @property
    def reweightable(self) -> bool:
        """Whether a prepared state serves every weighting, zero weights excluding a model (two-phase)."""
        return self.two_phase is not None

    def check_count(self, n: int, *, label: str = "", what: str = "models", given: str = "got") -> None:
        """ModelCountError unless n inputs (besides the base) fit ``min_models`` … ``max_models``."""
        check_model_count(n, self.min_models, self.max_models, label=label + self.name, what=what, given=given)


class Registry(Generic[Entry]):
    """Named entries of one kind (``kind`` names it in messages): added once, looked up by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        if name in self.entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self.entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry called ``name``; UnknownMethodError lists the known ones otherwise."""
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownMethodError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self.entries)


METHODS: Registry[MergeMethod] = Registry("merge method")
"""Every merge method of tensors, by mergekit name."""


def add_method(method: MergeMethod) -> MergeMethod:
    """Register ``method`` after checking that its rules are consistent (names unique, ``base_mode`` a
    bool parameter, ``two_phase.prepared_by`` declared parameters, the signature of ``fn``)."""
    if method.base_mode is not None and method.param(method.base_mode).kind is not bool:
        raise ValueError(f"{method.name}: base_mode {method.base_mode!r} must name a bool parameter")
    for name in method.two_phase.prepared_by if method.two_phase else ():
        method.param(name)
    signature = inspect.signature(method.fn).parameters
    keywords = {n for n, a in signature.items() if a.kind is inspect.Parameter.KEYWORD_ONLY} - set(CONTEXT)
    declared = {p.name for p in method.params}
    takes_any = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in signature.values())  # e.g. ``lambda``
    if keywords != declared and not (takes_any and keywords <= declared):
        raise ValueError(f"{method.name}: the keyword parameters of {method.fn.__name__} "
                         f"{sorted(keywords)} differ from the declared parameters {sorted(declared)}")
    return METHODS.add(method.name, method)


def register(name: str, **rules: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as merge method ``name`` (mergekit's ``merge_method``); ``rules`` are
    the other fields of :class:`MergeMethod` (summary, params, base, weights, min_models, ...)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        add_method(MergeMethod(name=name, fn=fn, **rules))
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; UnknownMethodError lists the known ones otherwise."""
    return METHODS.get(name)


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return METHODS.names()
