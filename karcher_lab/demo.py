"""The interim main job: merge a few generated checkpoints with karcher and two baselines, compare.

A tiny Llama-architecture causal LM is built from a config with a fixed seed (the "base"), and N
"experts" are derived from it by adding seeded task vectors of different strengths and directions;
each is saved as an ordinary safetensors checkpoint. Every tensor is then merged with ``karcher``,
``linear`` and ``ties`` through :func:`karcher_lab.merge_tensors`, and the merged models are compared
on what the Fisher–Rao paper cares about: norm shrinkage of the merged weights (merged norm over the
weighted mean of the experts' norms) and the function distance KL(p_expert ‖ p_merged) of next-token
distributions on random token sequences (the paper's eq. 2), plus wall time.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from karcher_lab.merge import merge_tensors

DEMO_METHODS = ("karcher", "linear", "ties")


@dataclass
class DemoRow:
    method: str
    norm_ratio: float
    kl_to_experts: float
    seconds: float


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def generate_checkpoints(directory: Path, n_experts: int, seed: int) -> tuple[Path, list[Path]]:
    """Write a base and ``n_experts`` perturbed experts as ``<dir>/<name>/model.safetensors``."""
    model = _tiny_llama(seed)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    paths = []
    for i in range(n_experts):
        strength = 0.3 + 0.5 * i / max(n_experts - 1, 1)  # near and far experts
        expert = {
            k: v + strength * v.std() * torch.randn(v.shape, generator=generator) if v.ndim == 2 else v.clone()
            for k, v in base.items()
        }
        paths.append(_save(directory / f"expert_{i}", expert))
    return _save(directory / "base", base), paths


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def _next_token_log_probs(model, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=tokens).logits.float(), dim=-1)


def run_demo(n_experts: int = 5, seed: int = 0) -> list[DemoRow]:
    """Generate checkpoints, merge them with each demo method and measure; returns one row per method."""
    with tempfile.TemporaryDirectory() as tmp:
        base_path, expert_paths = generate_checkpoints(Path(tmp), n_experts, seed)
        base = load_file(str(base_path / "model.safetensors"))
        experts = [load_file(str(p / "model.safetensors")) for p in expert_paths]
    model = _tiny_llama(seed)
    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(seed))
    expert_logp = [_next_token_log_probs(model, e, tokens) for e in experts]
    rows = []
    for method in DEMO_METHODS:
        start = time.perf_counter()
        merged = {
            name: merge_tensors(method, [e[name] for e in experts], base=base[name], name=name)
            for name in base
        }
        seconds = time.perf_counter() - start
        ratios = [
            float(merged[k].norm() / torch.stack([e[k].norm() for e in experts]).mean())
            for k in base if base[k].ndim == 2
        ]
        merged_logp = _next_token_log_probs(model, merged, tokens)
        kl = torch.stack([
            (lp.exp() * (lp - merged_logp)).sum(-1).mean() for lp in expert_logp
        ]).mean()
        rows.append(DemoRow(method, sum(ratios) / len(ratios), float(kl), seconds))
    return rows


def format_rows(rows: list[DemoRow], n_experts: int) -> str:
    lines = [
        f"Merging {n_experts} generated experts of a tiny Llama (equal weights, every tensor):",
        f"{'method':<10} {'norm ratio':>11} {'mean KL(expert||merged)':>24} {'seconds':>8}",
    ]
    lines += [f"{r.method:<10} {r.norm_ratio:>11.4f} {r.kl_to_experts:>24.4f} {r.seconds:>8.3f}" for r in rows]
    lines.append("norm ratio = ||merged|| / mean ||expert|| over 2-D weights (1 = no shrinkage).")
    return "\n".join(lines)
