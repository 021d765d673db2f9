"""Reading checkpoints lazily, checking architectures, and writing merged checkpoints atomically."""
from karcher_lab.io.architecture import Layout, Source, check_layout, layer_index, natural_key
from karcher_lab.io.checkpoint import Checkpoint, StateDictSource, TensorInfo
from karcher_lab.io.output import atomic_directory, check_output_path
from karcher_lab.io.resolve import resolve_model_dir
from karcher_lab.io.writer import ShardedSafetensorsWriter, TensorSpec, parse_size

__all__ = [
    "Checkpoint", "Layout", "ShardedSafetensorsWriter", "Source", "StateDictSource", "TensorInfo", "TensorSpec",
    "atomic_directory", "check_layout", "check_output_path", "layer_index", "natural_key", "parse_size", "resolve_model_dir",
]
