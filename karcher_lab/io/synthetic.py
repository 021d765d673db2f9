"""Generated checkpoints for tests, benchmarks and the mergekit comparison (no network needed).

:func:`tiny_config` gives a small Llama or Qwen2 config; :func:`base_state` initializes that
architecture with a fixed seed through transformers; :func:`expert_states` derives "fine-tuned"
experts as the base plus seeded task vectors; :func:`write_checkpoint` saves a state dict as a
transformers checkpoint directory (config.json, generation_config.json, safetensors, single or
sharded, and a small word-level tokenizer), so that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def tiny_config(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    """A small causal-LM config dict (``arch`` is ``llama`` or ``qwen2``); ``overrides`` replace keys."""
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(overrides)
    return config


def _config_object(config: dict[str, Any]):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return AutoConfig.for_model(config["model_type"], **fields)


def base_state(config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random initialization of the architecture (transformers' own init), as a state dict.

    Tied models (``tie_word_embeddings``) return no ``lm_head.weight``, as their checkpoints store none.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config_object(config))
    state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return state


def expert_states(
    base: dict[str, torch.Tensor], n: int, seed: int = 1, strength: float = 0.05, shared: float = 0.0
) -> list[dict[str, torch.Tensor]]:
    """``n`` experts θ0 + s·std(θ0)·ε (seeded; s grows from ``strength`` to 3×), where
    ε = √shared·ε_common + √(1 − shared)·ε_i mixes a direction common to all experts (fine-tunes of one
    base tend to share one) with each expert's own standard normal noise."""
    generator = torch.Generator().manual_seed(seed)
    common = {name: torch.randn(t.shape, generator=generator, dtype=torch.float32) for name, t in base.items()} if shared else {}
    experts = []
    for i in range(n):
        s = strength * (1 + 2 * i / max(n - 1, 1))
        expert = {}
        for name, t in base.items():
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            if shared:
                noise = shared**0.5 * common[name] + (1 - shared) ** 0.5 * noise
            scale = float(t.float().std()) if t.numel() > 1 and float(t.float().std()) > 0 else 1.0
            expert[name] = (t.float() + s * scale * noise).to(t.dtype)
        experts.append(expert)
    return experts


def write_tokenizer(directory: Path, vocab_size: int, tokens: list[str] | None = None) -> None:
    """A word-level tokenizer (whitespace split) over ``<pad> <s> </s>`` and ``tokens`` (default
    ``t3 … t{V−1}``), with ids in that order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = tokens if tokens is not None else [f"t{i}" for i in range(3, vocab_size)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {t: i for i, t in enumerate(tokens, start=3)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    fast.save_pretrained(str(directory))


def write_checkpoint(
    directory: str | Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    shard_bytes: int | None = None,
    tokenizer: bool = True,
    tokens: list[str] | None = None,
) -> Path:
    """Save ``state`` with ``config`` as a transformers checkpoint directory; return its path.

    ``shard_bytes`` splits the weights into ``model-0000i-of-0000N.safetensors`` shards with an index
    (our own streaming writer); otherwise one ``model.safetensors``.
    """
    from karcher_lab.io.writer import ShardedSafetensorsWriter, TensorSpec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    total = sum(s.nbytes for s in specs)
    writer = ShardedSafetensorsWriter(directory, specs, shard_bytes or total + 1)
    for k, v in state.items():
        writer.write(k, v)
    writer.finish()
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"), "pad_token_id": config.get("pad_token_id")}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if tokenizer:
        write_tokenizer(directory, config["vocab_size"], tokens)
    return directory


def write_reordered_vocabulary_checkpoint(
    directory: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor], *, extra_tokens: int = 4, seed: int = 0
) -> tuple[Path, dict[str, int]]:
    """The same model under another tokenizer: the tokens ``t3 … t{V−1}`` get shuffled ids, and
    ``extra_tokens`` new tokens ``x0 …`` (with random rows) are added. The embedding and head rows
    move with their tokens. Returns the directory and the new token → id map."""
    import random

    vocab_size = config["vocab_size"]
    tokens = [f"t{i}" for i in range(3, vocab_size)] + [f"x{i}" for i in range(extra_tokens)]
    random.Random(seed).shuffle(tokens)
    ids = {t: i for i, t in enumerate(tokens, start=3)}
    generator = torch.Generator().manual_seed(seed)
    moved = dict(state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in state:
            continue
        old = state[name]
        rows = 0.02 * torch.randn(vocab_size + extra_tokens, old.shape[1], generator=generator, dtype=torch.float32)
        rows = rows.to(old.dtype)
        rows[:3] = old[:3]
        for token, i in ids.items():
            if token.startswith("t"):
                rows[i] = old[int(token[1:])]
        moved[name] = rows
    new_config = dict(config, vocab_size=vocab_size + extra_tokens)
    return write_checkpoint(directory, new_config, moved, tokens=tokens), ids


PICO_MODELS = ("picollama", "picogranite", "picollava", "picogpt2")
"""The tiny architectures mergekit 0.1.5's tests merge (its tests/common.py), and a small GPT-2."""


def pico_config(kind: str):
    """The transformers config of a pico model: ``picollama``, ``picogranite`` and ``picollava`` as in
    mergekit's tests/common.py; ``picogpt2`` a 4-layer GPT-2 of width 32 (mergekit's is GPT-2 size)."""
    from transformers import CLIPVisionConfig, GPT2Config, GraniteConfig, LlamaConfig, LlavaConfig

    llama = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
    if kind == "picollama":
        return LlamaConfig(**llama)
    if kind == "picogranite":
        return GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                             num_key_value_heads=2, num_hidden_layers=2)
    if kind == "picollava":
        vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                                  hidden_size=64, intermediate_size=128)
        return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**llama), image_seq_length=16)
    if kind == "picogpt2":
        return GPT2Config(n_ctx=64, n_embd=32, n_head=4, n_layer=4, n_positions=64, vocab_size=64)
    raise ValueError(f"unknown pico model {kind!r}; known: {', '.join(PICO_MODELS)}")


def write_pico_model(directory: str | Path, kind: str, seed: int, vision_layers: int | None = None) -> Path:
    """Save a pico model (:func:`pico_config`) with ``save_pretrained``, every parameter drawn from a
    generator seeded with ``seed`` (0.02·N(0, 1), in the model's parameter order), so the weights do
    not depend on transformers' initializers. ``vision_layers`` changes a LLaVA's vision-tower depth."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlavaForConditionalGeneration

    config = pico_config(kind)
    if vision_layers is not None:
        config.vision_config.num_hidden_layers = vision_layers
    model_class = {"picollava": LlavaForConditionalGeneration, "picogpt2": GPT2LMHeadModel}.get(kind, AutoModelForCausalLM)
    model = model_class.from_config(config) if model_class is AutoModelForCausalLM else model_class(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory
