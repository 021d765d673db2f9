"""Writing a merge plan's result as a complete checkpoint directory, atomically: sharded safetensors,
config.json, generation config, tokenizer files, the recipe as run and a model card."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from karcher_lab.errors import CheckpointError
from karcher_lab.io.architecture import Source
from karcher_lab.io.output import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    atomic_directory,
    copy_files,
    model_card,
    output_config,
    write_json,
)
from karcher_lab.io.writer import ShardedSafetensorsWriter, TensorSpec
from karcher_lab.methods.registry import REQUIRED
from karcher_lab.pipeline.execute import MergeStats, TensorCache, execute_plan
from karcher_lab.pipeline.plan import MergePlan
from karcher_lab.recipe.schema import ModelEntry, ModelRef, SliceSource

def _yaml_value(value: Any) -> Any:
    """Settings as YAML; in-memory tensor-valued parameters (e.g. a Fisher dict) are named, not dumped."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, list):
        return [_yaml_value(v) for v in value]
    if isinstance(value, Mapping) and set(value) <= {"filter", "value"}:
        return {k: _yaml_value(v) for k, v in value.items()}
    return f"<in-memory {type(value).__name__}>"


def _entry_parameters(entry: ModelEntry | SliceSource) -> dict[str, Any]:
    return {"parameters": {k: _yaml_value(v) for k, v in entry.parameters.items()}} if entry.parameters else {}


def resolved_recipe_yaml(plan: MergePlan, seed: int | None) -> str:
    """The recipe as run, with the method's defaults filled in (still a valid mergekit recipe)."""
    import yaml

    from karcher_lab import __version__

    r = plan.recipe
    params = {k: _yaml_value(v) for k, v in r.parameters.items()}
    for p in plan.method.params:
        if p.name not in params and p.default is not REQUIRED and p.default is not None and p.kind is not object:
            params[p.name] = p.default
    data: dict[str, Any] = {"merge_method": r.merge_method}
    if r.base_model is not None:
        data["base_model"] = str(r.base_model)
    if r.slices:
        data["slices"] = [
            {
                "sources": [{"model": str(s.model), "layer_range": list(s.layer_range), **_entry_parameters(s)} for s in out_slice.sources],
                **({"base_model": str(out_slice.base_model)} if out_slice.base_model else {}),
                **({"parameters": out_slice.parameters} if out_slice.parameters else {}),
            }
            for out_slice in r.slices
        ]
    else:
        data["models"] = [{"model": str(e.model), **_entry_parameters(e)} for e in r.models]
    data["parameters"] = params
    for key in ("dtype", "out_dtype"):
        if getattr(r, key):
            data[key] = getattr(r, key)
    if r.tokenizer_source is not None:
        data["tokenizer_source"] = str(r.tokenizer_source)
    data["seed"] = 0 if seed is None else int(seed)
    header = f"# karcher-lab {__version__}: the recipe as run, method defaults filled in (seed: ours; mergekit ignores it)\n"
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _tokenizer_dir(plan: MergePlan, sources: Mapping[ModelRef, Source]) -> Path | None:
    """Directory to copy tokenizer files from: the tokenizer_source model, else the base, else the first
    model (``union`` is accepted only for identical tokenizers, see :func:`_vocabulary_alignment`)."""
    r = plan.recipe
    ref = r.tokenizer_source if isinstance(r.tokenizer_source, ModelRef) else None
    return sources[ref or r.base_model or r.models[0].model].directory


def write_output(
    plan: MergePlan,
    sources: Mapping[ModelRef, Source],
    out: Path,
    *,
    device: torch.device,
    stats: MergeStats,
    seed: int | None,
    out_shard_size: int,
    overwrite: bool,
    cache: TensorCache | None = None,
    merge_one: Callable[..., torch.Tensor] | None = None,
    progress: bool = False,
) -> None:
    """Merge into a complete checkpoint directory at ``out``, atomically (see karcher_lab.io.output)."""
    from karcher_lab import __version__

    specs = [TensorSpec(t.name, t.shape, t.out_dtype) for t in plan.tasks]
    tokenizer_dir = _tokenizer_dir(plan, sources)
    donor_dir = plan.donor.directory
    if not plan.donor.config:
        raise CheckpointError(f"model {plan.donor.label} has no config; writing a checkpoint needs the donor's config.json")
    recipe_yaml = resolved_recipe_yaml(plan, seed)
    dtype_name = plan.recipe.out_dtype or plan.recipe.dtype or plan.donor.config.get("torch_dtype") or plan.donor.config.get("dtype") or "float32"
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, out_shard_size)
        try:
            execute_plan(plan, writer.write, device=device, stats=stats, cache=cache, merge_one=merge_one, progress=progress)
            files = writer.finish()
        finally:
            writer.close()
        config = output_config(plan.donor.config, dtype_name, plan.layout.untied_head)
        if plan.alignment is not None:
            config["vocab_size"] = plan.alignment.size
        write_json(tmp / "config.json", config)
        files += ["config.json"] + copy_files(donor_dir, tmp, (GENERATION_CONFIG,))
        files += copy_files(tokenizer_dir, tmp, tuple(f for f in TOKENIZER_FILES if f not in files))
        (tmp / "merge_recipe.yml").write_text(recipe_yaml, encoding="utf-8")
        base = str(plan.recipe.base_model) if plan.recipe.base_model else None
        card = model_card(plan.method.name, [str(e.model) for e in plan.recipe.models], base, recipe_yaml, __version__)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        files += ["merge_recipe.yml", "README.md"]
        stats.bytes_written = sum((tmp / f).stat().st_size for f in files)
        stats.files = sorted(files)
    stats.out = out
