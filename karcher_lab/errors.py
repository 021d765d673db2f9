"""Exceptions raised by karcher_lab.

Every check on user input raises one of these *before* any work is done, with a message that names
the offending tensor, model index or parameter. All derive from :class:`KarcherLabError`; input and
parameter errors also derive from :class:`ValueError` so generic handlers keep working.
"""
from __future__ import annotations


class KarcherLabError(Exception):
    """Base class of every error karcher_lab raises on purpose."""


class InputError(KarcherLabError, ValueError):
    """The tensors handed to a merge are unusable."""


class EmptyInputError(InputError):
    """No tensors (or an empty list of models) were given."""


class ModelCountError(InputError):
    """The method needs a different number of models (e.g. slerp takes exactly two)."""


class ShapeMismatchError(InputError):
    """Inputs (or the base) do not share one shape."""


class NonFiniteError(InputError):
    """An input contains NaN or Inf."""


class MissingBaseError(InputError):
    """The method needs a base model and none was given."""


class ZeroNormError(InputError):
    """A block has zero norm where the method needs a direction."""


class AntipodalError(InputError):
    """Points are (nearly) antipodal on the sphere, so the Log map / Karcher mean is not unique."""


class ManifoldError(InputError):
    """A point is not on the manifold a geometry function expects: a matrix that is not symmetric positive
    definite, columns that are not orthonormal, or LoRA factors whose product has rank below r."""


class ConvergenceError(KarcherLabError, RuntimeError):
    """An iterative geometric solver (e.g. the Stiefel logarithm) did not reach its tolerance within its
    iteration cap; the message gives the residual reached and what to change."""


class WeightError(KarcherLabError, ValueError):
    """Weights have the wrong length, are all zero, non-finite, or negative where that is not allowed."""


class ParameterError(KarcherLabError, ValueError):
    """A method parameter is unknown, missing, of the wrong type or out of range."""


class StepSizeError(ParameterError):
    """The Karcher step size η is outside (0, 1]."""


class UnknownMethodError(KarcherLabError, LookupError):
    """No merge method is registered under that name."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class NotSupportedError(KarcherLabError, NotImplementedError):
    """A valid request that karcher_lab does not support yet."""


class CheckpointError(InputError):
    """A model cannot be found or read: no such directory, not in the local Hugging Face cache,
    no config.json, no weights, or a weights format that cannot be loaded safely."""


class DataError(InputError):
    """Evaluation data (prompt/answer examples or probe texts) cannot be used: a missing or unreadable file,
    bytes that are not UTF-8, malformed JSON, a missing column, an empty answer or a value that is not
    text. The message names the file (or the in-memory source), the line or index, and the column."""


class ArchitectureMismatchError(InputError):
    """The models do not share tensor names and shapes (the message holds a table of differences)."""


class VocabularyMismatchError(ArchitectureMismatchError):
    """The models have different vocabulary sizes and the recipe does not say how to reconcile them."""


class RecipeError(KarcherLabError, ValueError):
    """A merge recipe (mergekit YAML schema) is malformed: the message names the offending key."""


class OutputError(KarcherLabError, OSError):
    """The output cannot be written: it exists (and overwrite is off), is a source, or the disk is full."""


class DeviceError(KarcherLabError, RuntimeError):
    """The requested compute device is not available (e.g. --device cuda without a CUDA GPU)."""
