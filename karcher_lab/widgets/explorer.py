"""MergeExplorer: pick experts, weights, a merge method and its parameters; watch the merged model's
quality, collapse curves, Karcher convergence and norm shrinkage update in place.

The panel is an ``ipywidgets.VBox`` subclass, so a notebook displays it by evaluating it (or with
``display(explorer)``). It only composes: merging is :class:`karcher_lab.MergeSession`, every number
comes from :mod:`karcher_lab.diagnostics`, figures from :mod:`karcher_lab.plots` and
:mod:`karcher_lab.widgets.figures`.

**One update** (:meth:`MergeExplorer.update`, or debounced after any control changes):

1. weights: slider values w_i of the checked experts, normalized α_i = w_i / Σ_checked w_j (shown next
   to the sliders); every method receives α (so ``task_arithmetic`` gets Σ λ_i = 1).
2. merge. karcher (fast path): one :class:`MergeSession` over *all* the pool's experts keeps their
   tensors and per-tensor Gram matrices (computed on the first karcher update); unchecked experts get
   α_i = 0, which excludes them, so a change of weights, η, max_iter, tol, init or subset re-solves the
   N×N problem and runs one combine pass per tensor. (A new block granularity or task-vector mode
   computes its Grams once.) Other methods merge the checked experts in a session of their own.
3. the merged state dict is loaded into ONE preallocated model (``load_state_dict``; nothing is
   re-instantiated).
4. figures, each refreshed as soon as its numbers exist: convergence trace (karcher's
   ``GramCache.traces``) and norm ratio per tensor (:func:`~karcher_lab.diagnostics.norm_ratios`: the
   merged state's norms over the experts', which are computed once); per checked task, exact match and answer NLL of the merged model against the
   task's expert (:func:`~karcher_lab.diagnostics.task_quality`) and KL(expert ‖ merged)
   (:func:`~karcher_lab.diagnostics.function_distance`) on ``quality_examples`` held-out examples; layer
   curves of activation variance, effective rank and numerical rank (bootstrap mean ± std,
   :func:`~karcher_lab.diagnostics.collapse_metrics`) of the merged model and of each checked expert, on
   a fixed probe batch of ``activation_examples`` sequences per pool task.

**Interactive speed** (issue 7: an update in ≤ 0.5 s on the tiny pool and ≤ 10 s on the SmolLM2 pool
on 2 CPU cores, ``benchmarks/explorer_update.py``): the merged model runs exactly twice per update, one
teacher-forced pass over every checked task's examples
(:func:`~karcher_lab.diagnostics.function.answer_log_probs`: length-sorted batches, the LM head only at
answer positions), from which NLL, KL, Fisher–Rao and exact match all come, and one forward over the
probe batch for the layer metrics (whose few tokens are kept, so each bootstrap spectrum is an
eigvalsh of a token Gram, not of a d×d covariance: :mod:`karcher_lab.diagnostics.activations`).
Exact match is read from that pass by default (``exact_match_mode="teacher_forced"``: the greedy answer
is the expected one iff the argmax is the answer token at every answer position; the same 0/1 as greedy
decoding with the zoo's character tokenizer, see :mod:`karcher_lab.diagnostics.function`);
``"greedy"`` decodes instead (one forward per generated token, several times slower). Every
expert-side number (its log-probabilities, quality and layer metrics) is computed once per expert and
cached. Defaults sized for interaction: 16 examples per task, 4 probe sequences per pool task (52 on
the tiny pool), 10 bootstrap draws; raise them for tighter error bars. A small model (under
``SINGLE_THREAD_PARAMETERS``, e.g. the tiny pool's 354k) is updated on one torch thread: its operations
are too small to split, and on shared cores two threads wait on each other at every one of them
(measured on 2 loaded cores: 1.8–2.6 s per tiny-pool update with 2 threads, 0.29–0.33 s with 1).
Measured 2026-11-24 on 2 idle cores: tiny pool 0.26–0.28 s median per weight, η or subset change;
SmolLM2 pool (5 experts, 135M parameters each) 4.4–4.7 s, of which merge 0.34 s, norm ratios 0.17 s,
quality 2.6 s, layer metrics 1.4 s (stage medians). With another single-threaded job running (load
1.0–2.8): tiny 0.41–0.42 s, SmolLM2 7.5–8.8 s (merge 0.64 s, norm ratios 0.25 s, quality 4.8 s,
layer metrics 2.5 s).
The code before the answer-position head, length-sorted batches, cached expert norms and token-Gram
spectra took 14.0–16.3 s in the same conditions (norm ratios 1.15 s, quality 6.4 s, layer metrics 6.5 s).

While an update runs, the ``kl-busy`` element shows "updating…" (empty when idle); any exception
(a typed :mod:`karcher_lab.errors` error or another) is shown in the ``kl-error`` area, the figures keep
their last state, and nothing is raised to the notebook. CSS classes for browser tests: each weight
slider ``kl-weight-slider``, karcher's η slider ``kl-eta-slider``, ``kl-error``, ``kl-busy``, and every
plotly FigureWidget ``kl-figure``.
"""
from __future__ import annotations

import html
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Sequence

import ipywidgets as widgets
import pandas as pd
import torch

from karcher_lab.diagnostics import (
    capture_activations,
    collapse_metrics,
    encode_probes,
    function_distance,
    norm_ratios,
    task_quality,
    tensor_norms,
)
from karcher_lab.diagnostics.activations import check_sites
from karcher_lab.diagnostics.function import EXACT_MATCH_MODES, AnswerLogProbs, answer_log_probs
from karcher_lab.errors import CheckpointError, EmptyInputError, ModelCountError, ParameterError, WeightError
from karcher_lab.geometry import numerics
from karcher_lab.merge.registry import get_method, list_methods
from karcher_lab.pipeline import MergeSession
from karcher_lab.pipeline.plan import BASE_MODE_PARAMETERS
from karcher_lab.plots import layer_curves, task_bars
from karcher_lab.widgets.controls import STYLE, method_controls
from karcher_lab.widgets.figure_sync import sync_figure
from karcher_lab.widgets.figures import convergence_figure, figure_widget, norm_ratio_figure
from karcher_lab.zoo import Pool, find_pool, get_task, load

WEIGHT_CLASS = "kl-weight-slider"
ERROR_CLASS = "kl-error"
BUSY_CLASS = "kl-busy"
BUSY_TEXT = "updating…"
COLLAPSE_METRICS = ("variance", "effective_rank", "numerical_rank")
NARROW = dict(width=320, height=330, margin=dict(l=50, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.25))
WIDE = dict(width=480, height=360, margin=dict(l=60, r=10, t=50, b=40))
FULL_WIDTH = 960
"""Figure widths in pixels: three narrow or two wide figures fit a JupyterLab output area ~1000 px wide."""
DEFAULT_SELECTED = 4
"""Experts checked at start when ``selected`` is not given (the first ones of the pool)."""
SINGLE_THREAD_PARAMETERS = 10_000_000
"""Models with fewer parameters are updated on one torch thread unless ``single_threaded`` says otherwise."""
EVAL_BATCH = 256
"""At most this many sequences per forward pass of the evaluation (batches of similar length,
:func:`~karcher_lab.diagnostics.function.length_batches`)."""


@contextmanager
def quiet_loading():
    """transformers' per-checkpoint progress bars off while models load (in a notebook each one is
    a widget output), restored afterwards."""
    from transformers.utils import logging

    was_disabled = logging.is_progress_bar_enabled() is False
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            logging.enable_progress_bar()


class MergeExplorer(widgets.VBox):
    """Interactive merging of a pool's experts (see the module docstring for what one update does).

    ``pool``: a :class:`karcher_lab.zoo.Pool`, a pool name (``"tiny"``, ``"smollm2"``) or a pool
    directory. ``selected``: task names checked at start (default: the first four experts).
    ``quality_examples``: held-out examples per checked task for exact match, NLL and KL.
    ``activation_examples``: probe sequences per pool task for the layer metrics (one fixed batch).
    ``draws``: bootstrap draws for the layer metrics' ± std (≥ 2). ``exact_match``: show exact match
    (off: NLL and KL only); ``exact_match_mode``: ``"teacher_forced"`` (from the one forward pass,
    default) or ``"greedy"`` (decoding, slower). ``sites``: activation sites of the
    layer metrics (the figure shows the first). ``use_base``: give the pool's base model to methods
    that use one (methods that need one fail in the panel without it). ``debounce``: seconds of
    quiet after a control change before an update starts. ``initial_update``: run one update now, so
    the figures hold data when the panel is first shown. ``single_threaded``: run updates on one torch
    thread (restored afterwards); None: when the model has fewer than ``SINGLE_THREAD_PARAMETERS``
    parameters. Bad arguments raise before any model loads.
    """

    def __init__(
        self,
        pool: Pool | str,
        *,
        selected: Sequence[str] | None = None,
        method: str = "karcher",
        quality_examples: int = 16,
        activation_examples: int = 4,
        draws: int = 10,
        exact_match: bool = True,
        exact_match_mode: str = "teacher_forced",
        sites: Sequence[str] = ("residual",),
        use_base: bool = True,
        debounce: float = 0.3,
        seed: int = 0,
        initial_update: bool = True,
        single_threaded: bool | None = None,
    ):
        if quality_examples < 1 or activation_examples < 1:
            raise ParameterError(f"quality_examples and activation_examples must be >= 1, got {quality_examples} and {activation_examples}")
        if draws < 2:
            raise ParameterError(f"draws must be >= 2 for a ± std, got {draws}")
        if debounce < 0:
            raise ParameterError(f"debounce must be >= 0 seconds, got {debounce}")
        if exact_match_mode not in EXACT_MATCH_MODES:
            raise ParameterError(f"exact_match_mode must be one of {EXACT_MATCH_MODES}, got {exact_match_mode!r}")
        get_method(method)
        check_sites(sites)
        self.pool = pool if isinstance(pool, Pool) else find_pool(str(pool))
        self.tasks = [e["task"] for e in self.pool.experts]
        if not self.tasks:
            raise EmptyInputError(f"pool {self.pool.name} has no experts")
        selected = list(self.tasks[:DEFAULT_SELECTED] if selected is None else selected)
        unknown = [t for t in selected if t not in self.tasks]
        if unknown:
            raise ParameterError(f"selected task(s) {unknown} are not in pool {self.pool.name}: {self.tasks}")
        self.quality_examples, self.activation_examples, self.draws = quality_examples, activation_examples, draws
        self.exact_match, self.sites, self.seed, self.debounce = exact_match, tuple(sites), seed, debounce
        self.exact_match_mode = exact_match_mode

        self.expert_models: list[torch.nn.Module] = []
        base_record = self.pool.record.get("base")
        with quiet_loading():
            for expert in self.pool.experts:
                model, self.tokenizer = load(expert["path"])
                self.expert_models.append(model)
            self.base_model = load(str(self.pool.base_path))[0] if base_record else None
            self.model = load(str(self.pool.base_path) if base_record else self.pool.experts[0]["path"])[0]
            """The one model every merged state is loaded into."""
        self.single_threaded = (sum(p.numel() for p in self.model.parameters()) < SINGLE_THREAD_PARAMETERS
                                if single_threaded is None else bool(single_threaded))

        self._sessions: dict[tuple, MergeSession] = {}
        self._examples: dict[str, list] = {}
        self._expert_scores: dict[str, AnswerLogProbs] = {}
        self._expert_quality: dict[str, pd.DataFrame] = {}
        self._expert_norms: dict[str, dict[str, float]] = {}
        self._expert_collapse: dict[str, pd.DataFrame] = {}
        self._probes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.timings: dict[str, float] = {}
        """Seconds spent in each stage of the last successful update (merge, load, weights, quality, activations, total)."""
        self.tables: dict[str, Any] = {}
        """The last update's tables: quality, distance, collapse, weights (DataFrames) and traces."""
        self.state: dict[str, torch.Tensor] | None = None
        """The last merged state dict."""

        self._build_controls(selected, method, use_base)
        self._build_figures()
        super().__init__([self.header, self.controls_box, self.figures_box])
        if initial_update:
            self.update()

    # ----------------------------------------------------------------- controls
    def _build_controls(self, selected: list[str], method: str, use_base: bool) -> None:
        self.busy_indicator = widgets.HTML("")
        self.busy_indicator.add_class(BUSY_CLASS)
        self.error_area = widgets.HTML("")
        self.error_area.add_class(ERROR_CLASS)
        self.status = widgets.HTML("")
        self.header = widgets.VBox([widgets.HBox([widgets.HTML(f"<b>MergeExplorer</b> — pool {html.escape(self.pool.name)}"),
                                                  self.busy_indicator]), self.error_area, self.status])
        self.checkboxes, self.sliders, self.alpha_labels = [], [], []
        rows = []
        for task in self.tasks:
            checkbox = widgets.Checkbox(value=task in selected, description=task, indent=False,
                                        layout=widgets.Layout(width="9em"))
            slider = widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.01, readout_format=".2f",
                                         continuous_update=False, layout=widgets.Layout(width="18em"))
            slider.add_class(WEIGHT_CLASS)
            label = widgets.HTML("", layout=widgets.Layout(width="7em"))
            checkbox.observe(self._on_selection, "value")
            slider.observe(self._on_weight, "value")
            self.checkboxes.append(checkbox)
            self.sliders.append(slider)
            self.alpha_labels.append(label)
            rows.append(widgets.HBox([checkbox, slider, label]))
        self.method_dropdown = widgets.Dropdown(options=list_methods(), value=method, description="method", style=STYLE)
        self.method_dropdown.observe(self._on_method, "value")
        self.use_base_box = widgets.Checkbox(value=use_base and self.base_model is not None, indent=False,
                                             description="base model θ₀ for methods that use one",
                                             disabled=self.base_model is None, layout=widgets.Layout(width="auto"))
        self.use_base_box.observe(self._on_change, "value")
        self.method_info = widgets.HTML("")
        self.param_box = widgets.VBox([])
        self.param_controls: dict[str, widgets.Widget] = {}
        self._show_method_controls()
        self._refresh_weights()
        experts_box = widgets.VBox([widgets.HTML("<b>experts</b> (weight → normalized α)"), *rows])
        method_box = widgets.VBox([widgets.HTML("<b>method</b>"), self.method_dropdown, self.method_info,
                                   self.use_base_box, self.param_box])
        self.controls_box = widgets.HBox([experts_box, method_box])

    def _show_method_controls(self) -> None:
        method = get_method(self.method_dropdown.value)
        controls, unsettable = method_controls(method)
        for control in controls.values():
            control.observe(self._on_change, "value")
        self.param_controls = controls
        self.param_box.children = list(controls.values())
        notes = [html.escape(method.summary)]
        if method.base == "required":
            notes.append("needs the base model")
        if method.weights == "unused":
            notes.append("ignores the weights")
        if unsettable:
            notes.append(f"parameter(s) {', '.join(unsettable)} cannot be set in this panel")
        self.method_info.value = f"<small>{' · '.join(notes)}</small>"

    def _refresh_weights(self) -> None:
        """Show sliders for checked experts only, with their normalized weights α."""
        raw = [s.value if c.value else 0.0 for c, s in zip(self.checkboxes, self.sliders)]
        total = sum(raw)
        for checkbox, slider, label, w in zip(self.checkboxes, self.sliders, self.alpha_labels, raw):
            shown = "flex" if checkbox.value else "none"
            slider.layout.display = label.layout.display = shown
            label.value = f"α = {w / total:.3f}" if checkbox.value and total > 0 else "α = —"

    def _on_selection(self, change) -> None:
        self._refresh_weights()
        self._on_change(change)

    def _on_weight(self, change) -> None:
        self._refresh_weights()
        self._on_change(change)

    def _on_method(self, change) -> None:
        self._show_method_controls()
        self._on_change(change)

    def _on_change(self, change=None) -> None:
        self.schedule()

    # ----------------------------------------------------------------- scheduling
    def schedule(self) -> None:
        """Start an update after ``debounce`` seconds without further changes (restarts the clock)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.debounce, self._run)
        self._timer.daemon = True
        self._timer.start()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a scheduled (debounced) update has run and no update is in progress."""
        timer = self._timer
        if timer is not None:
            timer.join(timeout)
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()

    def update(self) -> bool:
        """Run one update now, in the calling thread (a pending debounced update is cancelled).
        Returns True on success; on failure the error is shown in the panel (``error``) and False returned."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._run()

    @property
    def error(self) -> str:
        """The text of the error shown in the panel ("" when the last update succeeded)."""
        return html.unescape(self.error_area.value.replace("<b>", "").replace("</b>", ""))

    @property
    def busy(self) -> bool:
        return self.busy_indicator.value != ""

    def _run(self) -> bool:
        with self._lock:
            self.busy_indicator.value = f"<span style='color:#d62728'>{BUSY_TEXT}</span>"
            try:
                with numerics.single_threaded() if self.single_threaded else nullcontext():
                    self._apply()
            except Exception as exc:  # every failure goes to the panel, never to the notebook
                self.error_area.value = (f"<b>{html.escape(type(exc).__name__)}</b>: {html.escape(str(exc))}")
                return False
            else:
                self.error_area.value = ""
                return True
            finally:
                self.busy_indicator.value = ""

    # ----------------------------------------------------------------- one update
    def request(self) -> dict[str, Any]:
        """What the controls ask for, checked before any work: ``method``, checked expert indices
        ``members``, normalized ``alpha`` (over the members), ``params``, ``use_base`` (whether the
        merge gets the pool's base model)."""
        method = get_method(self.method_dropdown.value)
        members = [i for i, c in enumerate(self.checkboxes) if c.value]
        if not members:
            raise EmptyInputError("no expert is checked: check at least one")
        if len(members) < method.min_models or (method.max_models is not None and len(members) > method.max_models):
            wanted = (f"exactly {method.min_models}" if method.max_models == method.min_models
                      else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else ""))
            raise ModelCountError(f"{method.name} merges {wanted} expert(s); {len(members)} are checked")
        raw = [self.sliders[i].value for i in members]
        if sum(raw) <= 0:
            raise WeightError("every checked expert has weight 0: give at least one a positive weight")
        alpha = [w / sum(raw) for w in raw]
        params = {name: control.value for name, control in self.param_controls.items()}
        for name, value in params.items():
            method.param(name).coerce(value, method.name)
        return dict(method=method.name, members=members, alpha=alpha, params=params,
                    use_base=self._gives_base(method, params))

    def _gives_base(self, method, params: dict[str, Any]) -> bool:
        """Whether the merge gets the pool's base as ``base_model``: only for a method that uses one
        (required, or optional and, for karcher, with ``task_vectors`` on). A method that ignores the
        base would take it as one more input (mergekit's rule, see :mod:`karcher_lab.pipeline.plan`)."""
        if not self.use_base_box.value or method.base == "unused":
            return False
        mode = BASE_MODE_PARAMETERS.get(method.name)
        return mode is None or bool(params.get(mode))

    def _session(self, members: tuple[int, ...], use_base: bool) -> MergeSession:
        key = (members, use_base)
        if key not in self._sessions:
            for old in [k for k in self._sessions if len(k[0]) != len(self.tasks)]:
                del self._sessions[old]  # keep the full-pool (karcher) sessions and the newest subset's
            self._sessions[key] = MergeSession([self.expert_models[i] for i in members],
                                               base=self.base_model if use_base else None, keep_inputs=True)
        return self._sessions[key]

    def merge_state(self, request: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
        """The merged state dict for ``request`` (see :meth:`request`) and karcher's traces ({} otherwise)."""
        members, alpha = request["members"], request["alpha"]
        if request["method"] == "karcher":
            session = self._session(tuple(range(len(self.tasks))), request["use_base"])
            weights = [0.0] * len(self.tasks)
            for i, a in zip(members, alpha):
                weights[i] = a
        else:
            session = self._session(tuple(members), request["use_base"])
            weights = alpha
        state = session.merge(request["method"], weights=weights, params=request["params"], seed=self.seed)
        traces = dict(session.grams.traces) if request["method"] == "karcher" else {}
        return state, traces

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the preallocated model; a tied head may be absent, nothing else."""
        result = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = set(result.missing_keys) - tied
        if missing or result.unexpected_keys:
            raise CheckpointError(f"the merged state does not fit the model: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(result.unexpected_keys)[:5]}")

    def _apply(self) -> None:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        request = self.request()
        members = request["members"]
        tasks = [self.tasks[i] for i in members]

        t = time.perf_counter()
        state, traces = self.merge_state(request)
        timings["merge"] = time.perf_counter() - t
        t = time.perf_counter()
        self.load_state(state)
        timings["load"] = time.perf_counter() - t
        self.state = state

        t = time.perf_counter()
        weights = norm_ratios(tensor_norms(state), [self._own_norms(i) for i in members], weights=request["alpha"])
        sync_figure(self.convergence_fig, convergence_figure(traces), **WIDE)
        sync_figure(self.norm_fig, norm_ratio_figure(weights), **WIDE)
        timings["weights"] = time.perf_counter() - t

        t = time.perf_counter()
        examples = {task: self._task_examples(task) for task in tasks}
        scores = answer_log_probs(self.model, self.tokenizer, examples, batch_size=EVAL_BATCH)
        quality = task_quality(self.model, self.tokenizer, examples, model_name="merged", accuracy=self.exact_match,
                               exact_match=self.exact_match_mode, log_probs=scores)
        own = pd.concat([self._own_quality(i) for i in members], ignore_index=True)
        distance = pd.concat([
            function_distance({task: self._own_scores(i)}, {task: scores[task]}, self.tokenizer, {task: examples[task]},
                              reference_name=task, model_name="merged")
            for i, task in zip(members, tasks)
        ], ignore_index=True)
        both = pd.concat([quality, own], ignore_index=True)
        if self.exact_match:
            sync_figure(self.accuracy_fig, task_bars(both, "accuracy", title="exact match"), **NARROW)
        sync_figure(self.nll_fig, task_bars(both, "nll", title="answer NLL (nats/token)"), **NARROW)
        sync_figure(self.kl_fig, task_bars(distance, "kl", title="KL(expert ‖ merged), own task"), **NARROW)
        timings["quality"] = time.perf_counter() - t

        t = time.perf_counter()
        ids, mask = self._probe_batch()
        stats = capture_activations(self.model, ids, mask, sites=self.sites, batch_size=64)
        merged = collapse_metrics(stats, model="merged", draws=self.draws, seed=self.seed)
        collapse = pd.concat([merged] + [self._own_collapse(i) for i in members], ignore_index=True)
        sync_figure(self.collapse_fig, layer_curves(collapse, list(COLLAPSE_METRICS), site=self.sites[0],
                                                    title="layer metrics: merged vs experts (mean ± std over bootstrap draws)"), width=FULL_WIDTH)
        timings["activations"] = time.perf_counter() - t

        timings["total"] = time.perf_counter() - start
        self.timings = timings
        self.tables = dict(quality=both, distance=distance, collapse=collapse, weights=weights, traces=traces)
        self.status.value = (f"<small>{request['method']} of {', '.join(tasks)}: merged in {timings['merge']:.2f} s, "
                             f"update {timings['total']:.2f} s</small>")

    # ----------------------------------------------------------------- cached expert-side numbers
    def _task_examples(self, task: str) -> list:
        if task not in self._examples:
            self._examples[task] = get_task(task).examples("eval", self.quality_examples, seed=self.seed)
        return self._examples[task]

    def _own_scores(self, index: int) -> AnswerLogProbs:
        """The expert's teacher-forced answer log-probabilities on its own task's examples."""
        task = self.tasks[index]
        if task not in self._expert_scores:
            self._expert_scores[task] = answer_log_probs(self.expert_models[index], self.tokenizer,
                                                         {task: self._task_examples(task)}, batch_size=EVAL_BATCH)[task]
        return self._expert_scores[task]

    def _own_norms(self, index: int) -> dict[str, float]:
        """The expert's tensor norms, by name (what the norm ratio divides by)."""
        task = self.tasks[index]
        if task not in self._expert_norms:
            self._expert_norms[task] = tensor_norms(self.expert_models[index].state_dict())
        return self._expert_norms[task]

    def _own_quality(self, index: int) -> pd.DataFrame:
        task = self.tasks[index]
        if task not in self._expert_quality:
            self._expert_quality[task] = task_quality(self.expert_models[index], self.tokenizer,
                                                      {task: self._task_examples(task)}, model_name="expert",
                                                      accuracy=self.exact_match, exact_match=self.exact_match_mode,
                                                      log_probs={task: self._own_scores(index)})
        return self._expert_quality[task]

    def _probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._probes is None:
            texts = [e.prompt + e.answer for task in self.tasks
                     for e in get_task(task).examples("eval", self.activation_examples, seed=self.seed + 1)]
            self._probes = encode_probes(self.tokenizer, texts)
        return self._probes

    def _own_collapse(self, index: int) -> pd.DataFrame:
        task = self.tasks[index]
        if task not in self._expert_collapse:
            ids, mask = self._probe_batch()
            stats = capture_activations(self.expert_models[index], ids, mask, sites=self.sites, batch_size=64)
            self._expert_collapse[task] = collapse_metrics(stats, model=task, draws=self.draws, seed=self.seed)
        return self._expert_collapse[task]

    # ----------------------------------------------------------------- figures
    def _build_figures(self) -> None:
        self.accuracy_fig = figure_widget()
        self.nll_fig = figure_widget()
        self.kl_fig = figure_widget()
        self.collapse_fig = figure_widget()
        self.convergence_fig = figure_widget()
        self.norm_fig = figure_widget()
        self.figures = [self.accuracy_fig, self.nll_fig, self.kl_fig, self.collapse_fig, self.convergence_fig, self.norm_fig]
        """Every FigureWidget of the panel (class ``kl-figure``); the exact-match one stays empty without ``exact_match``."""
        quality_row = [self.accuracy_fig, self.nll_fig, self.kl_fig] if self.exact_match else [self.nll_fig, self.kl_fig]
        self.figures_box = widgets.VBox([
            widgets.HBox(quality_row),
            widgets.HBox([self.convergence_fig, self.norm_fig]),
            self.collapse_fig,
        ])
