#!/usr/bin/env python3
"""Collapse diagnostics on SmolLM2-135M: time for all three metrics with a 100-draw bootstrap.

    .venv/bin/python benchmarks/diagnostics.py [--probes 64] [--tokens 128] [--draws 100] [--generated]

The model is SmolLM2-135M-Instruct from the zoo (``karcher_lab.zoo.load("smollm2")``, converted from its
wheel on first use); ``--generated`` (or no converted copy and no way to build one) uses a seeded
random LlamaForCausalLM of the same shape instead: 30 layers, d = 576, 9 heads, 3 KV heads,
intermediate 1536, vocabulary 49152. The probes are ``--probes`` windows of ``--tokens`` tokens of
real text (alternating King James Genesis and Python standard-library source from data/text/).

Timed, with torch on ``--threads`` threads (2, the target machine): (1) the forward passes through
nnsight with the running statistics of the residual stream of every block
(:func:`karcher_lab.diagnostics.capture_activations`), (2) variance, effective rank and numerical rank
per layer with ``--draws`` bootstrap draws (:func:`karcher_lab.diagnostics.collapse_metrics`).
Target (issue 5): (1) + (2) ≤ 60 s for 64 probes × 128 tokens and 100 draws on 2 CPU cores. The
machine may be shared: the load average before and after is printed with the times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from karcher_lab.diagnostics import capture_activations, collapse_metrics  # noqa: E402

TEXTS = [ROOT / "data" / "text" / "kjv_genesis.txt", ROOT / "data" / "text" / "python_stdlib.txt"]
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def load_model(generated: bool):
    """(model, tokenizer, description): SmolLM2-135M-Instruct, or a random model of its shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not generated:
        try:
            from karcher_lab.zoo import load

            model, tokenizer = load("smollm2")
            return model, tokenizer, "SmolLM2-135M-Instruct (zoo, dequantized Q4_1)"
        except Exception as error:  # noqa: BLE001 - fall back, and say why
            print(f"SmolLM2 unavailable ({type(error).__name__}: {error}); using a generated model of its shape")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval(), None, "generated LlamaForCausalLM of SmolLM2-135M's shape"


def probe_ids(tokenizer, vocab_size: int, probes: int, tokens: int) -> torch.Tensor:
    """``probes`` windows of ``tokens`` tokens, alternating between the two text files (random ids
    without a tokenizer)."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (probes, tokens), generator=torch.Generator().manual_seed(0))
    streams = [tokenizer(path.read_text())["input_ids"] for path in TEXTS]
    windows = []
    for i in range(probes):
        stream = streams[i % 2]
        start = (i // 2) * tokens
        if start + tokens > len(stream):
            raise SystemExit(f"not enough text for {probes} probes of {tokens} tokens")
        windows.append(stream[start : start + tokens])
    return torch.tensor(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generated", action="store_true", help="use a random model of SmolLM2-135M's shape")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, description = load_model(args.generated)
    ids = probe_ids(tokenizer, model.config.vocab_size, args.probes, args.tokens)
    load_before = os.getloadavg()[0]

    start = time.perf_counter()
    stats = capture_activations(model, ids, batch_size=args.batch_size)
    captured = time.perf_counter()
    table = collapse_metrics(stats, model="smollm2", draws=args.draws)
    done = time.perf_counter()

    capture_s, metrics_s = captured - start, done - captured
    print(f"model: {description}; {args.probes} probes x {args.tokens} tokens, {args.draws} bootstrap draws, "
          f"{stats.num_groups} groups, torch threads {args.threads}")
    print(f"forward passes + running statistics: {capture_s:6.1f} s")
    print(f"variance, effective rank, numerical rank ({stats.num_layers} layers x {args.draws + 1} spectra): {metrics_s:6.1f} s")
    print(f"total: {capture_s + metrics_s:6.1f} s (target <= 60 s); load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    pivot = table.pivot_table(index="layer", columns="metric", values=["point", "std"])
    print(pivot.iloc[:: max(1, stats.num_layers // 6)].round(3).to_string())
    if args.json:
        args.json.write_text(json.dumps(dict(
            model=description, probes=args.probes, tokens=args.tokens, draws=args.draws, threads=args.threads,
            capture_seconds=capture_s, metrics_seconds=metrics_s, total_seconds=capture_s + metrics_s,
            load_before=load_before, rows=table.to_dict(orient="records"),
        ), indent=1))


if __name__ == "__main__":
    main()
