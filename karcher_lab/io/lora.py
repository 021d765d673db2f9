"""PEFT LoRA adapters on disk: read one into per-module factors, write a merged one, fold one into its base.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
the legacy ``adapter_model.bin``). For every adapted ``nn.Linear`` ``M`` of the base model the weights
file holds ``base_model.model.M.lora_A.weight`` (A, [r, d_in]) and ``base_model.model.M.lora_B.weight``
(B, [d_out, r]); the layer computes ``W x + s B A x`` with the scaling (Hu et al. 2022, eq. 3)

    s = lora_alpha / r          (s = lora_alpha / √r with ``use_rslora``, Kalajdzievski 2023),

where ``r`` and ``lora_alpha`` are taken per module from ``rank_pattern`` / ``alpha_pattern`` when a
pattern matches (peft's rule: the pattern matches the module name or a dotted suffix of it) and from
``r`` / ``lora_alpha`` otherwise. This module exposes each adapted module as factors of the update in
the layer's [d_out, d_in] orientation,

    ΔW = G Hᵀ,   G = s B  [d_out, r],   H = Aᵀ  [d_in, r],

keyed by the name of the base weight it updates (``M.weight``); with ``fan_in_fan_out`` (GPT-2's
Conv1D) the stored base weight is [d_in, d_out] and receives ΔWᵀ. Adapters PEFT can train but that are
not a plain low-rank update of linear weights (DoRA, embedding LoRA, trained biases, modules_to_save)
raise :class:`~karcher_lab.errors.NotSupportedError` when read.

Writing (:func:`write_adapter`) stores factors (G, H) as B = G, A = Hᵀ with ``lora_alpha = r`` (s = 1)
per module, so ``PeftModel.from_pretrained`` applies exactly G Hᵀ; modules whose rank differs from the
most common one get ``rank_pattern`` / ``alpha_pattern`` entries. :func:`fold_into_base` writes the base
checkpoint with every updated weight replaced by W + ΔW as a complete Hugging Face directory. Both
write atomically (:func:`karcher_lab.io.output.atomic_directory`): on any failure nothing appears at
the output path.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from karcher_lab.errors import ArchitectureMismatchError, CheckpointError, NotSupportedError
from karcher_lab.io.architecture import natural_key
from karcher_lab.io.checkpoint import Checkpoint
from karcher_lab.io.output import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    atomic_directory,
    check_output_path,
    copy_files,
    model_card,
    output_config,
    write_json,
)
from karcher_lab.io.writer import ShardedSafetensorsWriter, TensorSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEGACY_ADAPTER_WEIGHTS = "adapter_model.bin"
RECORD_FILE = "lora_merge.yml"
_FACTOR_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

Factors = tuple[torch.Tensor, torch.Tensor]
"""(G [d_out, r], H [d_in, r]) with ΔW = G Hᵀ in the layer's [d_out, d_in] orientation."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: A [r, d_in], B [d_out, r] as stored, and its scaling s."""

    weight: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this module updates ([d_out, d_in], transposed with fan_in_fan_out)."""
        d_out, d_in = self.B.shape[0], self.A.shape[1]
        return (d_in, d_out) if self.fan_in_fan_out else (d_out, d_in)

    def factors(self, dtype: torch.dtype | None = None) -> Factors:
        """(G, H) = (s B, Aᵀ): ΔW = G Hᵀ, [d_out, d_in]; in ``dtype``, by default float32 (float64 for
        float64 factors; bf16/fp16 factors are upcast exactly)."""
        if dtype is None:
            dtype = torch.float64 if torch.float64 in (self.A.dtype, self.B.dtype) else torch.float32
        return self.B.to(dtype) * self.scaling, self.A.to(dtype).T.contiguous()

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW in the base weight's layout: s B A, transposed with ``fan_in_fan_out``."""
        g, h = self.factors(dtype)
        return layout_delta(g, h, self.fan_in_fan_out)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from ``directory``: its config and its modules keyed by base weight name."""

    directory: Path | None
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    label: str = ""

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def factors(self, dtype: torch.dtype | None = None) -> dict[str, Factors]:
        """{base weight name: (G, H)} for every module (see :meth:`LoraModule.factors`)."""
        return {name: m.factors(dtype) for name, m in self.modules.items()}


def layout_delta(g: torch.Tensor, h: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """G Hᵀ in the base weight's layout (its transpose for fan_in_fan_out layers)."""
    delta = g @ h.T
    return delta.T if fan_in_fan_out else delta


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, s) of ``module`` under ``config``: s = α / r, or α / √r with ``use_rslora``."""
    r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _read_config(directory: Path, label: str) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"adapter {label}: no such directory {directory}")
    if not path.is_file():
        hint = " (it is a full checkpoint, not an adapter)" if (directory / "config.json").is_file() else ""
        raise CheckpointError(f"adapter {label}: no {ADAPTER_CONFIG} in {directory}{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"adapter {label}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise NotSupportedError(f"adapter {label}: peft_type {kind} is not a LoRA adapter")
    unsupported = [key for key in ("use_dora", "modules_to_save", "trainable_token_indices") if config.get(key)]
    if str(config.get("bias", "none")) != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        raise NotSupportedError(f"adapter {label}: {', '.join(unsupported)} is not a plain low-rank update of linear "
                                "weights; only those can be merged")
    return config


def _read_weights(directory: Path, label: str) -> dict[str, torch.Tensor]:
    if (directory / ADAPTER_WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(directory / ADAPTER_WEIGHTS, device="cpu")
        except SafetensorError as exc:
            raise CheckpointError(f"adapter {label}: {ADAPTER_WEIGHTS} is not a valid safetensors file ({exc})") from None
    if (directory / LEGACY_ADAPTER_WEIGHTS).is_file():
        try:
            state = torch.load(directory / LEGACY_ADAPTER_WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (pickle/zip/OS errors all mean the same: unreadable)
            raise CheckpointError(f"adapter {label}: cannot read {LEGACY_ADAPTER_WEIGHTS} ({exc})") from None
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"adapter {label}: no {ADAPTER_WEIGHTS} (or {LEGACY_ADAPTER_WEIGHTS}) in {directory}")


def read_adapter(path: str | Path, label: str | None = None) -> LoraAdapter:
    """Read the PEFT LoRA adapter in directory ``path`` (see the module docstring).

    Raises CheckpointError for a missing/unreadable adapter, a factor without its partner or with a
    shape that disagrees with the config's rank, and NotSupportedError for non-LoRA or DoRA/embedding/bias
    adapters. Tensors keep their stored dtype.
    """
    directory = Path(path).expanduser()
    label = label or str(path)
    config = _read_config(directory, label)
    state = _read_weights(directory, label)
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _FACTOR_KEY.match(key)
        if match is None:
            raise NotSupportedError(f"adapter {label}: tensor {key!r} is not a LoRA A/B factor of a linear layer "
                                    "(embedding LoRA, DoRA magnitudes, biases and saved modules cannot be merged)")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise CheckpointError(f"adapter {label}: {key} has shape {tuple(tensor.shape)} / dtype {tensor.dtype}; "
                                  "expected a floating-point matrix")
        pieces.setdefault(match["module"], {})[match["which"]] = tensor
    if not pieces:
        raise CheckpointError(f"adapter {label}: {directory} holds no LoRA factors")
    modules: dict[str, LoraModule] = {}
    for module in sorted(pieces, key=natural_key):
        ab = pieces[module]
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter {label}: module {module} has lora_{''.join(ab)} but not its partner")
        r, scaling = module_scaling(config, module)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise CheckpointError(f"adapter {label}: module {module} has lora_A {tuple(ab['A'].shape)} and lora_B "
                                  f"{tuple(ab['B'].shape)}, but the config says rank {r}")
        weight = f"{module}.weight"
        modules[weight] = LoraModule(weight, ab["A"], ab["B"], scaling, bool(config.get("fan_in_fan_out", False)))
    return LoraAdapter(directory, config, modules, label)


def check_compatible(adapters: Sequence[LoraAdapter]) -> None:
    """Raise ArchitectureMismatchError unless the adapters share a base model (when recorded), the
    fan_in_fan_out layout, the set of adapted weights and each weight's shape. Ranks may differ."""
    first = adapters[0]
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        listing = "; ".join(f"{a.label}: {a.base_model}" for a in adapters)
        raise ArchitectureMismatchError(f"the adapters were trained on different base models ({listing})")
    for a in adapters[1:]:
        if a.fan_in_fan_out != first.fan_in_fan_out:
            raise ArchitectureMismatchError(f"adapter {a.label} has fan_in_fan_out={a.fan_in_fan_out}, "
                                            f"{first.label} has {first.fan_in_fan_out}")
        missing, extra = sorted(set(first.modules) - set(a.modules)), sorted(set(a.modules) - set(first.modules))
        if missing or extra:
            raise ArchitectureMismatchError(
                f"adapter {a.label} targets other modules than {first.label}: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, extra {extra[:4]}{' ...' if len(extra) > 4 else ''}")
        for name, m in a.modules.items():
            if m.weight_shape != first.modules[name].weight_shape:
                raise ArchitectureMismatchError(f"{name}: adapter {a.label} updates a {m.weight_shape} weight, "
                                                f"{first.label} a {first.modules[name].weight_shape} one")


def _merged_config(like: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
    """``like``'s config with s = 1 for every module: lora_alpha = r, patterns for off-rank modules."""
    config = dict(like)
    default = Counter(ranks.values()).most_common(1)[0][0]
    patterns = {re.escape(name.removesuffix(".weight")): r for name, r in ranks.items() if r != default}
    config.update(r=default, lora_alpha=default, use_rslora=False, use_dora=False, rank_pattern=patterns,
                  alpha_pattern=dict(patterns), inference_mode=True)
    return config


def _check_factors(factors: Mapping[str, Factors]) -> None:
    if not factors:
        raise CheckpointError("nothing to write: no merged modules")
    for name, (g, h) in factors.items():
        if g.dim() != 2 or h.dim() != 2 or g.shape[1] != h.shape[1]:
            raise ArchitectureMismatchError(f"{name}: factors of shapes {tuple(g.shape)} and {tuple(h.shape)} do not "
                                            "form G Hᵀ")


def write_adapter(
    out: str | Path,
    factors: Mapping[str, Factors],
    like: LoraAdapter,
    *,
    record: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``factors`` ({base weight name: (G, H)}) as a PEFT LoRA adapter directory at ``out``.

    The config is ``like``'s (base model, target modules, task type) with r, lora_alpha and the
    patterns set so that peft applies exactly G Hᵀ (s = 1). ``record`` (e.g. the method and its
    parameters) goes to lora_merge.yml and the README. ``dtype`` defaults to the factors' dtype.
    Atomic; OutputError for an existing ``out`` unless ``overwrite``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    _check_factors(factors)
    check_output_path(out, overwrite, [like.directory] if like.directory else [])
    ranks = {name: g.shape[1] for name, (g, h) in factors.items()}
    state = {}
    for name, (g, h) in factors.items():
        module = name.removesuffix(".weight")
        state[f"base_model.model.{module}.lora_A.weight"] = h.T.to(dtype or h.dtype).contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = g.to(dtype or g.dtype).contiguous()
    with atomic_directory(out, overwrite) as tmp:
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, _merged_config(like.config, ranks))
        _write_record(tmp, record, like.base_model, "peft")
    return out


def _write_record(directory: Path, record: Mapping[str, Any] | None, base: str | None, library: str) -> None:
    import yaml

    from karcher_lab import __version__

    record = dict(record or {})
    text = yaml.safe_dump(record, sort_keys=False, default_flow_style=None)
    (directory / RECORD_FILE).write_text(text, encoding="utf-8")
    card = model_card(str(record.get("method", "lora merge")), [str(a) for a in record.get("adapters", [])], base,
                      text, __version__)
    (directory / "README.md").write_text(card.replace("library_name: transformers", f"library_name: {library}", 1),
                                         encoding="utf-8")


def fold_into_tensor(weight: torch.Tensor, factors: Factors, fan_in_fan_out: bool) -> torch.Tensor:
    """W + ΔW in W's dtype, the sum computed in float32 (float64 if either side is float64)."""
    g, h = factors
    dtype = torch.float64 if torch.float64 in (weight.dtype, g.dtype) else torch.float32
    delta = layout_delta(g.to(dtype), h.to(dtype), fan_in_fan_out)
    if delta.shape != weight.shape:
        raise ArchitectureMismatchError(f"ΔW of shape {tuple(delta.shape)} cannot be added to a weight of shape "
                                        f"{tuple(weight.shape)}")
    return (weight.to(dtype) + delta).to(weight.dtype)


def fold_into_state(state: Mapping[str, torch.Tensor], factors: Mapping[str, Factors],
                    fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """A new state dict: ``state`` with each weight named in ``factors`` replaced by W + G Hᵀ."""
    missing = sorted(set(factors) - set(state))
    if missing:
        raise ArchitectureMismatchError(f"the base model has no weight(s) {missing[:4]} that the adapter updates")
    return {name: fold_into_tensor(t, factors[name], fan_in_fan_out) if name in factors else t
            for name, t in state.items()}


def fold_into_base(
    base: str | Path,
    factors: Mapping[str, Factors],
    out: str | Path,
    *,
    fan_in_fan_out: bool = False,
    record: Mapping[str, Any] | None = None,
    out_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
) -> Path:
    """Write the base checkpoint ``base`` with W ← W + G Hᵀ for every weight in ``factors`` to ``out``.

    ``out`` is a complete Hugging Face directory (sharded safetensors in the base's dtypes, config.json,
    generation config and tokenizer files copied from the base, lora_merge.yml and a README), written
    tensor by tensor through :class:`~karcher_lab.io.writer.ShardedSafetensorsWriter`. Every updated
    weight must exist in the base with ΔW's shape (ArchitectureMismatchError before anything is written).
    """
    from karcher_lab.io.resolve import resolve_model_dir

    _check_factors(factors)
    base_dir = resolve_model_dir(str(base))
    checkpoint = Checkpoint(base_dir, label=str(base))
    out = Path(out)
    problems = []
    for name, (g, h) in factors.items():
        info = checkpoint.tensors.get(name)
        shape = (h.shape[0], g.shape[0]) if fan_in_fan_out else (g.shape[0], h.shape[0])
        if info is None:
            problems.append(f"{name}: not in the base model")
        elif info.shape != shape:
            problems.append(f"{name}: the base weight is {info.shape}, ΔW is {shape}")
    if problems:
        raise ArchitectureMismatchError(f"the adapter does not fit the base model {base}: " + "; ".join(problems[:6]))
    check_output_path(out, overwrite, [base_dir])
    specs = [TensorSpec(name, info.shape, info.dtype) for name, info in checkpoint.tensors.items()]
    dtype_name = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype") or "float32"
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, out_shard_size)
        try:
            for spec in specs:
                weight = checkpoint.load(spec.name)
                if spec.name in factors:
                    weight = fold_into_tensor(weight, factors[spec.name], fan_in_fan_out)
                writer.write(spec.name, weight)
            writer.finish()
        finally:
            writer.close()
        write_json(tmp / "config.json", output_config(checkpoint.config, dtype_name, untied_head=False))
        copy_files(base_dir, tmp, (GENERATION_CONFIG, *TOKENIZER_FILES))
        _write_record(tmp, record, str(base), "transformers")
    return out


class AdapterOnBase(Checkpoint):
    """The base checkpoint with a PEFT adapter's update folded in, W + (α/r) B A, as each tensor is read
    (:func:`fold_into_tensor`): an adapter expert as a merge source, without building the folded model.

    Raises
    ------
    ArchitectureMismatchError
        The adapter updates a weight the base lacks.
    """

    def __init__(self, base: str | Path, adapter: str | Path, label: str):
        super().__init__(base, label)
        self.adapter_directory = Path(adapter)
        read = read_adapter(adapter, label)
        self._factors, self._fan_in_fan_out = read.factors(), read.fan_in_fan_out
        missing = sorted(set(self._factors) - set(self.tensors))
        if missing:
            raise ArchitectureMismatchError(f"adapter {label}: the base has no weight(s) {missing[:4]} that it updates")

    def load(self, name: str) -> torch.Tensor:
        tensor = super().load(name)
        return fold_into_tensor(tensor, self._factors[name], self._fan_in_fan_out) if name in self._factors else tensor

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of a tensor; an adapted weight is folded whole first (LoRA targets are linear layers, small
        beside an embedding)."""
        return self.load(name)[start:stop] if name in self._factors else super().load_rows(name, start, stop)
