"""MergeExplorer: pick experts, weights, a merge method and its parameters; watch the merged model's
quality, collapse curves, Karcher convergence and norm shrinkage update in place.

It opens on a :class:`karcher_lab.Study` (users' own model folders, task files and probes; or a study
YAML) or on a zoo pool, as the pool's built-in study (its experts named by their tasks). Experts are
judged on their own tasks; an expert that owns none is merged and drawn in the layer figure only, and
tasks no expert owns (held-out sets) are measured on every update.

The panel is an ``ipywidgets.VBox`` subclass, so a notebook displays it by evaluating it (or with
``display(explorer)``). It only composes: the controls are :class:`~karcher_lab.widgets.merge_controls.MergeControls`,
merges are :class:`karcher_lab.pipeline.SubsetMerger`'s, every number comes from
:class:`karcher_lab.measurement.MeasurementEngine`, the figures are
:class:`~karcher_lab.widgets.explorer_figures.ExplorerFigures`, and updates are debounced by
:class:`~karcher_lab.widgets.debounce.DebouncedRunner`.

**One update** (:meth:`MergeExplorer.update`, or debounced after any control changes):

1. request: the checked experts, their normalized weights α_i = w_i / Σ_checked w_j (every method
   receives α, so ``task_arithmetic`` gets Σ λ_i = 1), the method's parameters and the base checkbox,
   checked before any work (:meth:`MergeControls.request`).
2. merge (:meth:`SubsetMerger.merge`): karcher keeps one session over *all* the pool's experts, the
   unchecked ones at α_i = 0, so a change of weights, η, max_iter, tol, init or subset re-solves the
   N×N problem from the cached Gram matrices and runs one combine pass per tensor; other methods merge
   the checked experts. The base model reaches a method only when the checkbox is on and the method
   uses one. On a study whose experts are all PEFT LoRA adapters on its base, the dropdown also lists
   the LoRA methods as ``lora:<name>`` (geomerge among them): those merge the checked adapters' factors
   module by module (:class:`~karcher_lab.pipeline.adapter_subsets.AdapterSubsetMerger`; geomerge by its
   batched solver, on the explorer's device) and write base + merged ΔW into the model. Their merges are
   saved with ``karcher-lab lora-merge`` (the keep buttons say the command), not as a mergekit recipe.
3. load: each merged tensor is written into ONE preallocated model as soon as it exists (nothing is
   re-instantiated, and no merged state dict is held next to it); this stage checks that every tensor
   of the model was written. Experts are measured before the first merge, each written into that same
   model where its checkpoint fits it (:meth:`MeasurementEngine.measure_experts`).
4. measure and draw, each figure as soon as its numbers exist (the engine's three stages):
   weights (convergence trace and norm ratios per tensor against the experts' cached norms), function
   (one teacher-forced pass over the checked tasks' ``quality_examples`` examples each: exact match,
   answer NLL and KL(expert ‖ merged), next to each expert's cached numbers), layers (one forward over
   the probe batch of ``activation_examples`` sequences per pool task: variance, effective rank,
   numerical rank, bootstrap mean ± std, merged model and checked experts). Where the model's
   activations cannot be read (decoder blocks not found, a site its blocks lack), the layer figure and
   the status line say why, and the update still succeeds with the other figures.

``timings`` holds the seconds of each stage of the last successful update (merge, load, weights,
quality, activations, total); measured figures are in benchmarks/README.md
(``benchmarks/explorer_update.py``). A small model (under :data:`SINGLE_THREAD_PARAMETERS`) is updated
on one torch thread.

**Keeping a merge**: "save this merge" (:meth:`MergeExplorer.save_merge`) writes the merge the controls
ask for as a checkpoint folder, atomically, as ``karcher-lab merge`` writes it, with the mergekit recipe
(``merge_recipe.yml``) that reproduces its bytes; "show recipe" (:meth:`MergeExplorer.recipe_yaml`)
displays that recipe. The recipe names the members only (karcher's zero-weight experts are left out,
which gives the same mean up to float rounding).

While an update runs, the ``kl-busy`` element shows "updating…" (empty when idle); any exception is
shown in the ``kl-error`` area, the figures keep their last state, and nothing is raised to the
notebook. CSS classes for browser tests: each weight slider ``kl-weight-slider``, karcher's η slider
``kl-eta-slider``, ``kl-error``, ``kl-busy``, and every plotly FigureWidget ``kl-figure``.
"""
from __future__ import annotations

import html
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as widgets
import pandas as pd
import torch

from karcher_lab.checks import check_count
from karcher_lab.errors import EmptyInputError, NotSupportedError, ParameterError
from karcher_lab.geometry import numerics
from karcher_lab.measurement import MeasurementSettings, engine_for_study
from karcher_lab.measurement.cache import MeasurementCache
from karcher_lab.methods.lora import get_lora_method
from karcher_lab.methods.registry import get_method
from karcher_lab.pipeline.adapter_subsets import LORA_PREFIX, AdapterSubsetMerger, lora_method_choices
from karcher_lab.pipeline.subsets import SubsetMerger
from karcher_lab.widgets.debounce import DebouncedRunner
from karcher_lab.widgets.explorer_figures import ExplorerFigures
from karcher_lab.widgets.merge_controls import MergeControls
from karcher_lab.study import Study, as_study, pool_study
from karcher_lab.pipeline import MergeSession, MergeStats, resolved_recipe_yaml, run_recipe
from karcher_lab.recipe.schema import Recipe
from karcher_lab.study.resolve import is_adapter, merge_sources, model_folder
from karcher_lab.zoo import Pool, find_pool

DEFAULT_SELECTED = 4
"""Experts checked at start when ``selected`` is not given (the first ones of the pool)."""
SINGLE_THREAD_PARAMETERS = 10_000_000
"""Models with fewer parameters are updated on one torch thread unless ``single_threaded`` says otherwise:
their operations are too small to split, and on shared cores two threads wait on each other at each one."""
EVAL_BATCH = 256
"""At most this many sequences per forward pass of the evaluation (batches of similar length,
:func:`~karcher_lab.diagnostics.function.length_batches`)."""
PROBE_BATCH = 64
"""Probe sequences per forward pass of the activation capture."""
SAVE_CLASS = "kl-save-merge"
KEEP_OUTPUT_CLASS = "kl-keep-output"
"""CSS classes of the "save this merge" button and of the area showing the saved folder or the recipe."""


def checkpoint_paths(study: Study) -> tuple[list[str | None], str | None]:
    """The experts' and the base's checkpoint folders (None where a model exists only in memory: an
    in-memory model, or a PEFT adapter folded onto the base)."""

    def folder(source: Any) -> str | None:
        directory = model_folder(study, source)
        return None if directory is None or is_adapter(directory) else str(directory)

    return [folder(s) for s in study.experts.values()], folder(study.base) if study.base is not None else None


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

    Parameters
    ----------
    pool : Study, Pool or str
        A :class:`karcher_lab.Study` (users' own experts, tasks and probes) or the path of a study YAML
        (:func:`karcher_lab.load_study`); or a :class:`karcher_lab.zoo.Pool`, a pool name (``"tiny"``,
        ``"smollm2"``) or a pool directory, opened as its built-in study
        (:func:`~karcher_lab.study.pool_study`).
    selected : sequence of str, optional
        Experts (a pool's: task names) checked at start (default: the first :data:`DEFAULT_SELECTED` experts).
    method : str
        The method selected at start: a tensor method, or on a study whose experts are all PEFT LoRA
        adapters on its base, a LoRA method as ``lora:<name>`` (e.g. ``lora:geomerge``).
    quality_examples : int
        Held-out examples per checked task for exact match, NLL and KL.
    activation_examples : int
        Probe sequences per task for the layer metrics (one fixed batch; a pool's every task, a study's
        tasks' prompts when it names no probes).
    draws : int
        Bootstrap draws for the layer metrics' ± std (≥ 2).
    exact_match : bool
        Show exact match (off: NLL and KL only).
    exact_match_mode : {"teacher_forced", "greedy"}, optional
        Exact match from the one teacher-forced pass or by greedy decoding (slower). Default: greedy for a
        study (real tokenizers), teacher-forced for a zoo pool, whose character tokenizer makes the two
        the same 0/1.
    sites : sequence of str
        Activation sites of the layer metrics (the figure shows the first).
    use_base : bool
        Give the pool's base model to methods that use one (methods that need one fail in the panel
        without it).
    debounce : float
        Seconds of quiet after a control change before an update starts.
    seed : int
        Seed of the evaluation examples (the probes use ``seed + 1``), the bootstrap and randomized methods.
    initial_update : bool
        Run one update now, so the figures hold data when the panel is first shown.
    single_threaded : bool, optional
        Run updates on one torch thread (restored afterwards); None: when the model has fewer than
        :data:`SINGLE_THREAD_PARAMETERS` parameters.
    device : str, optional
        Where merges and every evaluation run (``cpu`` or ``cuda``; DeviceError when unavailable); default
        the study's ``device``, else cpu.
    dtype : {"auto", "float32", "bfloat16", "float16"}
        The dtype experts and the merged model are loaded in (``auto``: the checkpoints' own).
    cache_measurements : bool
        Keep the experts' measurements in the disk cache (:mod:`karcher_lab.measurement.cache`), so a
        later explorer over the same experts, data and settings does not run them again.

    Bad arguments raise before any model loads.
    """

    def __init__(
        self,
        pool: Study | Pool | str,
        *,
        selected: Sequence[str] | None = None,
        method: str = "karcher",
        quality_examples: int = 16,
        activation_examples: int = 4,
        draws: int = 10,
        exact_match: bool = True,
        exact_match_mode: str | None = None,
        sites: Sequence[str] = ("residual",),
        use_base: bool = True,
        debounce: float = 0.3,
        seed: int = 0,
        initial_update: bool = True,
        single_threaded: bool | None = None,
        device: str | None = None,
        dtype: str = "auto",
        cache_measurements: bool = True,
    ):
        study = as_study(pool)
        device = device or (study.device if study is not None else None) or "cpu"
        if exact_match_mode is None:
            exact_match_mode = "greedy" if study is not None else "teacher_forced"
        settings = MeasurementSettings(sites=sites, draws=draws, seed=seed, exact_match=exact_match,
                                       exact_match_mode=exact_match_mode, eval_batch_size=EVAL_BATCH,
                                       probe_batch_size=PROBE_BATCH, device=device, dtype=dtype)
        check_count("quality_examples", quality_examples)
        check_count("activation_examples", activation_examples)
        self.runner = DebouncedRunner(self._work, debounce)
        """Debounced, shielded updates (its ``busy_indicator`` and ``error_area`` are in the header)."""
        if method.startswith(LORA_PREFIX):
            get_lora_method(method.removeprefix(LORA_PREFIX))
        else:
            get_method(method)
        kind = "pool" if study is None else "study"
        if study is None:
            study = pool_study(pool if isinstance(pool, Pool) else find_pool(str(pool)),
                               probes_per_task=activation_examples, probe_seed=seed + 1)
        self.study = study
        """The explored :class:`~karcher_lab.study.Study` (a zoo pool's built-in one for a pool)."""
        self.label = f"{kind} {self.study.name}"
        self.tasks = list(self.study.experts)
        """The experts' names (a pool's experts are named by their task)."""
        if not self.tasks:
            raise EmptyInputError(f"{self.label} has no experts")
        selected = list(self.tasks[:DEFAULT_SELECTED] if selected is None else selected)
        unknown = [t for t in selected if t not in self.tasks]
        if unknown:
            raise ParameterError(f"selected expert(s) {unknown} are not in {self.label}: {self.tasks}")
        lora_methods = lora_method_choices(self.study)
        if method.startswith(LORA_PREFIX) and method not in lora_methods:
            raise ParameterError(f"{method} merges PEFT LoRA adapters: {self.label} has experts that are no adapters "
                                 "on its base")

        with quiet_loading():
            self.engine = engine_for_study(self.study, settings=settings, examples_per_task=quality_examples,
                                           probes_per_task=activation_examples,
                                           cache=MeasurementCache() if cache_measurements else None)
            """Every number of an update (expert-side ones computed once, one expert loaded at a time)."""
        self.expert_paths, self.base_path = checkpoint_paths(self.study)
        """Each expert's and the base's checkpoint folder (None for a model held only in memory): what a
        saved merge's recipe names."""
        sources, base = merge_sources(self.study)
        self.has_base = base is not None
        """Whether the study has a base model."""
        self.merger = SubsetMerger(list(sources.values()), base=base, device=settings.device)
        """Every merge of an update, read from the experts' checkpoints one tensor at a time (karcher's
        Gram matrices kept across updates)."""
        self.adapter_merger = AdapterSubsetMerger.for_study(self.study) if lora_methods else None
        """Merges with the LoRA methods (``lora:<name>``) where every expert is a PEFT adapter on the base; else None."""
        self.model = self.engine.model
        """The one model every merged state is loaded into."""
        self.tokenizer = self.engine.data.tokenizer
        self.single_threaded = (sum(p.numel() for p in self.model.parameters()) < SINGLE_THREAD_PARAMETERS
                                if single_threaded is None else bool(single_threaded))
        self.timings: dict[str, float] = {}
        """Seconds spent in each stage of the last successful update (merge, load, weights, quality, activations, total)."""
        self.tables: dict[str, Any] = {}
        """The last update's tables: quality, distance, collapse, weights (DataFrames) and traces."""
        self.state: dict[str, torch.Tensor] | None = None
        """The last merge's tensors by name: the resident model's own (they change with the next update)."""

        self.controls = MergeControls(self.tasks, selected=selected, method=method,
                                      has_base=self.has_base, use_base=use_base,
                                      on_change=self.schedule, extra_methods=lora_methods)
        self.checkboxes, self.sliders, self.alpha_labels = self.controls.checkboxes, self.controls.sliders, self.controls.alpha_labels
        self.method_dropdown, self.use_base_box = self.controls.method_dropdown, self.controls.use_base_box
        self.method_info, self.param_box = self.controls.method_info, self.controls.param_box
        self.busy_indicator, self.error_area = self.runner.busy_indicator, self.runner.error_area
        self.status = widgets.HTML("")
        self.header = widgets.VBox([widgets.HBox([widgets.HTML(f"<b>MergeExplorer</b> — {html.escape(self.label)}"),
                                                  self.busy_indicator]), self.error_area, self.status])
        self.figure_panel = ExplorerFigures(exact_match=settings.exact_match, site=settings.sites[0])
        panel = self.figure_panel
        self.accuracy_fig, self.nll_fig, self.kl_fig = panel.accuracy, panel.nll, panel.kl
        self.collapse_fig, self.convergence_fig, self.norm_fig = panel.collapse, panel.convergence, panel.norm
        self.figures = panel.widgets
        """Every FigureWidget of the panel (class ``kl-figure``); the exact-match one stays empty without ``exact_match``."""
        self.controls_box, self.figures_box = self.controls, panel.box
        self.save_path = widgets.Text(value="merged/", description="folder", layout=widgets.Layout(width="22em"))
        self.save_button = widgets.Button(description="save this merge", icon="save")
        self.recipe_button = widgets.Button(description="show recipe", icon="file-text")
        self.keep_output = widgets.HTML("")
        """The saved folder, or the recipe, or why neither could be made."""
        self.save_button.add_class(SAVE_CLASS)
        self.keep_output.add_class(KEEP_OUTPUT_CLASS)
        self.save_button.on_click(lambda _: self._keep(lambda: f"saved to {self.save_merge(self.save_path.value).out}"))
        self.recipe_button.on_click(lambda _: self._keep(lambda: f"<pre>{html.escape(self.recipe_yaml())}</pre>", raw=True))
        self.keep_box = widgets.VBox([widgets.HBox([self.save_path, self.save_button, self.recipe_button]),
                                      self.keep_output])
        super().__init__([self.header, self.controls_box, self.keep_box, self.figures_box])
        if initial_update:
            self.update()

    # ----------------------------------------------------------------- keeping a merge
    def recipe(self) -> Recipe:
        """The mergekit recipe of the merge the controls ask for (:meth:`SubsetMerger.recipe`)."""
        request = self.request()
        if request["method"].startswith(LORA_PREFIX):
            folders = " ".join(str(model_folder(self.study, self.study.experts[self.tasks[i]])) for i in request["members"])
            raise NotSupportedError(
                f"{request['method']} is a LoRA merge, which mergekit's recipes do not describe: save it with "
                f"karcher-lab lora-merge {folders} --method {request['method'].removeprefix(LORA_PREFIX)} "
                f"--weights {' '.join(f'{a:g}' for a in request['alpha'])} --out DIR "
                f"(add --fold-into {model_folder(self.study, self.study.base)} for a full checkpoint)")
        return self.merger.recipe(request["method"], request["members"], request["alpha"], paths=self.expert_paths,
                                  base_path=self.base_path, params=request["params"], use_base=request["use_base"])

    def recipe_yaml(self) -> str:
        """:meth:`recipe` as the YAML :meth:`save_merge` writes (``merge_recipe.yml``), defaults filled in."""
        recipe, seed = self.recipe(), self.engine.settings.seed
        session = MergeSession([e.model for e in recipe.models], base=recipe.base_model, cache_states=False)
        return resolved_recipe_yaml(session.plan(recipe, seed), seed)

    def save_merge(self, out: str | Path, *, overwrite: bool = False) -> MergeStats:
        """Write the merge the controls ask for as a checkpoint folder ``out``, atomically, as
        ``karcher-lab merge`` writes it (with ``merge_recipe.yml``, which reproduces the same bytes)."""
        return run_recipe(self.recipe(), out, seed=self.engine.settings.seed, overwrite=overwrite)

    def _keep(self, action, raw: bool = False) -> None:
        try:
            text = action()
        except Exception as exc:  # shown in the panel, never raised to the notebook
            self.keep_output.value = f"<b>{html.escape(type(exc).__name__)}</b>: {html.escape(str(exc))}"
        else:
            self.keep_output.value = text if raw else html.escape(text)

    @property
    def param_controls(self) -> dict[str, widgets.Widget]:
        """The selected method's parameter controls by parameter name."""
        return self.controls.param_controls

    # ----------------------------------------------------------------- scheduling
    def schedule(self) -> None:
        """Start an update after ``debounce`` seconds without further changes (restarts the clock)."""
        self.runner.schedule()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a scheduled (debounced) update has run and no update is in progress."""
        self.runner.wait(timeout)

    def update(self) -> bool:
        """Run one update now, in the calling thread (a pending debounced update is cancelled).
        Returns True on success; on failure the error is shown in the panel (``error``) and False returned."""
        return self.runner.run()

    @property
    def error(self) -> str:
        """The text of the error shown in the panel ("" when the last update succeeded)."""
        return self.runner.error

    @property
    def busy(self) -> bool:
        """Whether an update is in progress."""
        return self.runner.busy

    def _work(self) -> None:
        with numerics.single_threaded() if self.single_threaded else nullcontext():
            self._apply()

    # ----------------------------------------------------------------- one update
    def request(self) -> dict[str, Any]:
        """What the controls ask for, checked before any work (:meth:`MergeControls.request`): ``method``,
        checked expert indices ``members``, normalized ``alpha``, ``params``, ``use_base``."""
        return self.controls.request()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the preallocated model (:meth:`MeasurementEngine.load_state`)."""
        self.engine.load_state(state)

    def _apply(self) -> None:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        request = self.request()
        names = [self.tasks[i] for i in request["members"]]

        self.engine.measure_experts()  # before a merge is written into the model (see MeasurementEngine)
        t = time.perf_counter()
        writer = self.engine.merge_writer()
        if request["method"].startswith(LORA_PREFIX):
            merged = self.adapter_merger.merge(request["method"], request["members"], request["alpha"],
                                               params=request["params"], sink=writer, device=self.engine.settings.device)
        else:
            merged = self.merger.merge(request["method"], request["members"], request["alpha"], params=request["params"],
                                       seed=self.engine.settings.seed, use_base=request["use_base"], sink=writer)
        timings["merge"] = time.perf_counter() - t
        t = time.perf_counter()
        writer.check_complete()
        timings["load"] = time.perf_counter() - t
        self.state = writer.written

        t = time.perf_counter()
        weights = self.engine.weight_metrics(writer.written, names, request["alpha"], norm_only=True)
        self.figure_panel.show_weights(merged.traces, weights)
        timings["weights"] = time.perf_counter() - t

        t = time.perf_counter()
        function = self.engine.function_metrics(names)
        quality = pd.concat([function.quality, function.expert_quality], ignore_index=True)
        self.figure_panel.show_function(quality, function.distance)
        timings["quality"] = time.perf_counter() - t

        t = time.perf_counter()
        layers = self.engine.layer_metrics(names)
        collapse = pd.concat([layers.merged, layers.experts], ignore_index=True)
        self.figure_panel.show_layers(collapse, layers.note)
        timings["activations"] = time.perf_counter() - t

        timings["total"] = time.perf_counter() - start
        self.timings = timings
        self.tables = dict(quality=quality, distance=function.distance, collapse=collapse, weights=weights,
                           traces=merged.traces)
        note = f"<br><small>{html.escape(layers.note)}</small>" if layers.note else ""
        self.status.value = (f"<small>{request['method']} of {', '.join(names)}: merged in {timings['merge']:.2f} s, "
                             f"update {timings['total']:.2f} s</small>{note}")
