"""How a merged model and its experts are measured: activation sites, bootstrap draws, exact match,
batch sizes and device, checked once when the settings are made."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from karcher_lab.checks import check_choice, check_count, resolve_device
from karcher_lab.diagnostics.activations import check_sites
from karcher_lab.diagnostics.collapse import DEFAULT_DRAWS
from karcher_lab.diagnostics.function import EXACT_MATCH_MODES
from karcher_lab.errors import ParameterError

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The dtypes models can be loaded in (``auto``: the checkpoint's own)."""


@dataclass(frozen=True)
class MeasurementSettings:
    """Settings of a :class:`~karcher_lab.measurement.engine.MeasurementEngine`.

    Parameters
    ----------
    sites : sequence of str
        Activation sites of the layer metrics (``residual``, ``attention``, ``mlp``;
        :data:`karcher_lab.diagnostics.SITES`), stored as a tuple.
    draws : int
        Bootstrap draws of the layer metrics' mean ± std (≥ 2;
        :func:`~karcher_lab.diagnostics.collapse_metrics`).
    seed : int
        Seed of the bootstrap draws (the same draws for every model, so ratios are paired).
    exact_match : bool
        Measure exact match (and normalized accuracy); off: NLL, KL and Fisher–Rao only.
    exact_match_mode : {"teacher_forced", "greedy"}
        Exact match read from the one teacher-forced pass, or by greedy decoding
        (:func:`~karcher_lab.diagnostics.task_quality`). Tasks with a
        :class:`~karcher_lab.diagnostics.scoring.TaskScoring` (every study task) are always decoded.
    eval_batch_size : int
        Sequences per forward pass of the teacher-forced evaluation (length-sorted batches,
        :func:`~karcher_lab.diagnostics.function.answer_log_probs`).
    probe_batch_size : int
        Probe sequences per forward pass of the activation capture.
    layers_path : str, optional
        The dotted path of the models' decoder blocks (e.g. ``transformer.h``); default: found by
        :func:`~karcher_lab.diagnostics.activations.decoder_layers`'s search.
    device : str or torch.device
        Where models run (``cpu``, ``cuda``); a torch.device once made (DeviceError when unavailable).
    dtype : {"auto", "float32", "bfloat16", "float16"}
        The dtype experts and the merged model are loaded in: ``auto`` keeps each checkpoint's own
        (bf16 and fp16 experts stay in half the memory), the others cast.

    Every bad value raises ParameterError (DeviceError for the device) naming it.
    """

    sites: tuple[str, ...] = ("residual",)
    draws: int = DEFAULT_DRAWS
    seed: int = 0
    exact_match: bool = True
    exact_match_mode: str = "teacher_forced"
    eval_batch_size: int = 64
    probe_batch_size: int = 64
    device: str | torch.device = "cpu"
    layers_path: str | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, MODEL_DTYPES)
        if self.layers_path is not None and (not isinstance(self.layers_path, str) or not self.layers_path):
            raise ParameterError(f"layers_path must be a dotted module path such as 'transformer.h', got {self.layers_path!r}")
        object.__setattr__(self, "sites", check_sites(self.sites))
        check_count("draws", self.draws, 2)
        check_choice("exact_match_mode", self.exact_match_mode, EXACT_MATCH_MODES)
        check_count("eval_batch_size", self.eval_batch_size)
        check_count("probe_batch_size", self.probe_batch_size)
        object.__setattr__(self, "exact_match", bool(self.exact_match))
        object.__setattr__(self, "device", resolve_device(self.device))
