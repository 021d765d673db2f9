"""Diagonal Fisher information of a causal LM on a task's probe inputs, with labels sampled from the model.

Matena & Raffel 2022 ("Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832) estimate the
diagonal of the Fisher F(θ) = E_x E_{y ~ p_θ(·|x)} [∇_θ log p_θ(y|x) ∇_θ log p_θ(y|x)ᵀ] by sampling
the labels from the model itself (the "true" Fisher, not the empirical one built on the data's labels).
For a task example x = ``<s> prompt answer </s>`` (teacher-forced, :mod:`karcher_lab.diagnostics.sequences`)
the prediction is the next-token distribution at each answer position t, and one sample draws
ŷ_t ~ p_θ(· | context_t) independently at every answer position:

    F̂_j = (1 / (N S)) Σ_{n=1..N} Σ_{s=1..S} ( ∂/∂θ_j Σ_t log p_θ(ŷ_t^{(n,s)} | context_{n,t}) )².

It is unbiased for Σ_t F_t (the cross terms between positions vanish in expectation, because
E_y[∇ log p(y)] = 0). Examples run one at a time (squared per-example gradients cannot be batched).

The result maps every parameter name (tied parameters under each of their names, as in the state
dict) to a float32 CPU tensor of the parameter's shape, so it feeds the ``fisher`` merge method
directly: ``karcher_lab.merge(models, "fisher", model_params=[{"fisher": f} for f in fishers])``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.function import answer_batches, answer_logits, model_device
from karcher_lab.errors import EmptyInputError, ParameterError


def diagonal_fisher(
    model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, samples: int = 1, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``model`` on ``examples`` (see the module docstring): ``samples`` label
    draws per example from a generator seeded ``seed``; {parameter name: float32 tensor}."""
    if len(examples) == 0:
        raise EmptyInputError("no examples to estimate the Fisher on")
    if samples < 1:
        raise ParameterError(f"samples must be >= 1, got {samples}")
    device = model_device(model)
    named = list(model.named_parameters(remove_duplicate=False))
    params = list(dict.fromkeys(p for _, p in named if p.requires_grad))
    total = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _, input_ids, targets in answer_batches(tokenizer, examples, batch_size=1):
            log_probs = torch.log_softmax(answer_logits(model, input_ids, targets).float(), dim=-1)  # [T, V]
            with torch.no_grad():
                labels = torch.multinomial(log_probs.exp(), samples, replacement=True, generator=generator)  # [T, S]
            for s in range(samples):
                log_likelihood = log_probs.gather(1, labels[:, s : s + 1]).sum()
                grads = torch.autograd.grad(log_likelihood, params, retain_graph=s < samples - 1, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        total[p].add_(g.float().square())
    finally:
        model.train(was_training)
    scale = 1.0 / (len(examples) * samples)
    return {name: total[p].mul(scale).cpu() for name, p in named if p in total}
