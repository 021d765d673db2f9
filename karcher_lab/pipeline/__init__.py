"""Model-level merging: a recipe becomes one task per tensor, executed as a stream.

Three steps, each checkable on its own:

1. **Open** the models (:func:`open_model`): local directories, hub ids from the local cache, or
   in-memory state dicts / transformers models. Only headers and config.json are read.
2. **Plan** (:func:`plan_merge`): check the architecture, map the recipe's models and base onto the
   method's inputs exactly as mergekit does, and resolve every parameter for every tensor (scalars,
   gradients over the layer index, ``[{filter, value}]`` lists; see :mod:`karcher_lab.recipe.parameters`).
   All validation (recipe, architecture, parameters, weights, output path) happens here, before any
   tensor is read: every distinct parameter set is also run once on small probe tensors, so that
   checks a method makes only when called fail here, naming the tensor.
3. **Execute** (:func:`execute_plan`): tensor by tensor, load the N inputs (and the base), merge them
   with :func:`karcher_lab.merge_tensors` on the chosen device, and hand the result to a sink: the
   streaming sharded writer (:func:`run_recipe`, the CLI) or a dict (the Python API). Peak memory is
   about (N inputs + 1 output) × the largest tensor, independent of the model's total size.

How recipe models become method inputs (mergekit's semantics) is described in :mod:`~karcher_lab.pipeline.plan`.

For repeated merges of the same models (widgets), :class:`MergeSession` keeps the models open and keeps
per-tensor state between calls: optionally the loaded inputs, the plan (a re-weighted merge is not
re-planned), and for two-phase methods (karcher) the prepared state, so that re-weighting (or changing
η, max_iter, tol, init) re-solves in coefficient space and only runs the combine pass: no input is
re-read or re-normalized. :class:`SubsetMerger` merges any subset of a fixed list of experts.

Modules: :mod:`~karcher_lab.pipeline.plan` (step 2), :mod:`~karcher_lab.pipeline.execute` (step 3),
:mod:`~karcher_lab.pipeline.write` (the checkpoint directory), :mod:`~karcher_lab.pipeline.session`
(the entry points: :func:`merge_models`, :func:`run_recipe`, :class:`MergeSession`).
"""
from karcher_lab.pipeline.execute import MergeStats, TensorCache, execute_plan
from karcher_lab.pipeline.plan import MergePlan, TensorTask, plan_merge, tensor_seed
from karcher_lab.pipeline.session import MergeSession, merge_models, open_model, resolve_device, run_recipe
from karcher_lab.pipeline.subsets import MergedState, SubsetMerger
from karcher_lab.pipeline.write import resolved_recipe_yaml, write_output

__all__ = [
    "MergePlan", "MergeSession", "MergeStats", "MergedState", "SubsetMerger", "TensorCache", "TensorTask", "execute_plan", "merge_models",
    "open_model", "plan_merge", "resolve_device", "resolved_recipe_yaml", "run_recipe", "tensor_seed", "write_output",
]
