"""Planning a recipe whose ``slices`` assemble a new layer stack (mergekit 0.1.5's semantics).

Each output slice ``k`` merges, layer by layer, layers [start_j, end_j) of its sources j (all equally
deep, L_k layers) into the next L_k layers of the output; the slices are stacked in order, so the
output has Σ L_k layers (``passthrough`` slices of one source each: a frankenmerge). Per slice:

* the method's inputs are the slice's sources; its base is the slice's ``base_model``, else the
  recipe's, and must be one of the slice's sources for a method that uses a base (mergekit reads the
  base's tensor from the slice); unlike the ``models`` form, a base that is not a source is not added;
* parameters resolve from the source's own ``parameters``, then the slice's, then the global ones, at
  layer position t = i / (L_k − 1) of the slice's layer i (1 when L_k = 1);
* the tensors before the layer stack (embeddings) are merged from the first slice's sources with its
  parameters, those after it (final norm, LM head) from the last slice's, at t = 0; an LM head absent
  from every such source (tied embeddings) stays absent, as mergekit skips that optional tensor.

The output's config is the base model's, else the first model's, with its layer count
(``num_hidden_layers``, GPT-2's ``n_layer`` ...) set to Σ L_k. Every slice must give the method the same
number of inputs (and all or none a base): each input position j is one
:class:`~karcher_lab.io.stacked.RemappedSource` assembled over the slices.
"""
from __future__ import annotations

from typing import Any, Mapping

from karcher_lab.errors import MissingBaseError, NotSupportedError, RecipeError
from karcher_lab.io.architecture import Source, check_layout, is_embedding, layer_index
from karcher_lab.io.stacked import RemappedSource, outer_names, slice_names
from karcher_lab.methods.registry import REQUIRED, MergeMethod
from karcher_lab.pipeline.plan import MergePlan, check_model_count, check_parameter_names, probe_parameters, resolve_task
from karcher_lab.recipe.parameters import NUM_LAYERS_KEYS
from karcher_lab.recipe.schema import DTYPES, ModelRef, OutputSlice, Recipe, SliceSource


def _slice_inputs(recipe: Recipe, method: MergeMethod, k: int, out_slice: OutputSlice) -> tuple[list[SliceSource], SliceSource | None]:
    """(the method's inputs, its base or None) within slice ``k`` (module docstring)."""
    base_ref = out_slice.base_model or recipe.base_model
    base = next((s for s in out_slice.sources if s.model == base_ref), None)
    setting = out_slice.parameters.get(method.base_mode, recipe.parameters.get(method.base_mode, False)) if method.base_mode else False
    if method.base == "first":
        if base is None:
            raise MissingBaseError(f"slices[{k}]: {method.name} interpolates from the base model (t = 0): give a base_model that is one of the slice's sources")
        return [base] + [s for s in out_slice.sources if s is not base], None
    if not method.uses_base({method.base_mode: setting} if method.base_mode else {}):
        return list(out_slice.sources), None
    if base is None:
        if method.base == "required":
            where = f"base_model {base_ref} is not one of its sources" if base_ref else "no base_model is given"
            raise MissingBaseError(f"slices[{k}]: {method.name} needs a base model among the slice's sources, but {where}")
        return list(out_slice.sources), None
    return [s for s in out_slice.sources if s is not base], base


def plan_slices(recipe: Recipe, sources: Mapping[ModelRef, Source], method: MergeMethod, *, seed: int | None) -> MergePlan:
    """The plan of a slices recipe (module docstring); nothing is read but headers and configs."""
    if recipe.tokenizer_source is not None:
        raise NotSupportedError("tokenizer_source with layer ranges or several slices is not supported yet")
    if any(p.kind is object and p.per_model and p.default is REQUIRED for p in method.params):
        raise NotSupportedError(f"{method.name} takes per-tensor parameters, which slices do not support yet")
    warnings: list[str] = []
    scopes: list[tuple[str, Mapping[str, Any]]] = [("parameters", recipe.parameters)]
    for k, out_slice in enumerate(recipe.slices):
        scopes.append((f"slices[{k}].parameters", out_slice.parameters))
        scopes += [(f"slices[{k}].sources[{i}].parameters", s.parameters) for i, s in enumerate(out_slice.sources)]
    check_parameter_names(method, scopes, warnings)

    arranged = [_slice_inputs(recipe, method, k, s) for k, s in enumerate(recipe.slices)]
    n_inputs, has_base = len(arranged[0][0]), arranged[0][1] is not None
    for k, (inputs, base) in enumerate(arranged):
        if len(inputs) != n_inputs or (base is not None) != has_base:
            raise NotSupportedError(
                f"slices[{k}] gives {method.name} {len(inputs)} input(s){' and a base' if base else ''}, slices[0] "
                f"{n_inputs}{' and a base' if has_base else ''}; slices that differ in their number of inputs are not supported yet"
            )
    check_model_count(method, n_inputs)

    # Each input position (and the base) assembled over the slices: output name → (source, stored name).
    positions = [[inputs[j] for inputs, _ in arranged] for j in range(n_inputs)] + ([[b for _, b in arranged]] if has_base else [])
    where: dict[str, tuple[int, float]] = {}  # output name → (slice, t)
    assembled = []
    for j, per_slice in enumerate(positions):
        reads: dict[str, tuple[Source, str]] = {}
        first, last = sources[per_slice[0].model], sources[per_slice[-1].model]
        reads.update({n: (first, n) for n in outer_names(first, embeddings=True)})
        offset = 0
        for k, src in enumerate(per_slice):
            length = src.layer_range[1] - src.layer_range[0]
            for out_name, stored in slice_names(sources[src.model], src.layer_range, offset).items():
                reads[out_name] = (sources[src.model], stored)
                i = layer_index(out_name) - offset
                where[out_name] = (k, i / (length - 1) if length > 1 else 1.0)
            offset += length
        reads.update({n: (last, n) for n in outer_names(last, embeddings=False)})
        label = " | ".join(dict.fromkeys(str(s.model) for s in per_slice))
        assembled.append(RemappedSource(f"slices input {j} ({label})", last.config, last.directory, reads))
    total_layers = offset
    layout = check_layout(assembled)

    donor_ref = recipe.base_model or recipe.all_models()[0]
    donor = sources[donor_ref]
    config = dict(donor.config)
    keys = [key for key in NUM_LAYERS_KEYS if isinstance(config.get(key), int)]
    if not keys:
        raise RecipeError(f"slices: the config of {donor_ref} names no layer count ({', '.join(NUM_LAYERS_KEYS)}) to set to {total_layers}")
    config[keys[0]] = total_layers
    out_donor = RemappedSource(donor.label, config, donor.directory, {})

    load_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    save_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else None
    last_slice = len(recipe.slices) - 1
    tasks, probed = [], set()
    for name in layout.names:
        k, t = where.get(name, (0 if is_embedding(name) else last_slice, 0.0))
        out_slice = recipe.slices[k]
        inputs, _ = arranged[k]
        model_scopes = [(s.parameters, out_slice.parameters, recipe.parameters) for s in inputs]
        task = resolve_task(
            method, name, layout.shapes[name], assembled[0].tensors[layout.stored_names[0][name]].dtype, t, model_scopes,
            (out_slice.parameters, recipe.parameters), [s.model for s in inputs], load_dtype=load_dtype, save_dtype=save_dtype, seed=seed,
        )
        if task.floating:
            probe_parameters(method, task, n_inputs, has_base, probed)
        tasks.append(task)
    refs = [ModelRef(s.label) for s in assembled]
    inputs_out = list(zip(refs[:n_inputs], assembled[:n_inputs]))
    base_out = (refs[-1], assembled[-1]) if has_base else None
    return MergePlan(recipe, method, inputs_out, base_out, layout, tasks, out_donor, load_dtype, None, warnings)
