"""Fisher-preconditioned karcher (§3.4): uniform Fishers give plain karcher; a closed form; bad input."""
import math

import pytest
import torch

from karcher_lab import merge_tensors
from karcher_lab.errors import MissingBaseError, ParameterError, ShapeMismatchError
from karcher_lab.merge.karcher import fisher_karcher


def _experts(n=4, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + 0.7 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("block", ["tensor", "row"])
def test_uniform_fisher_gives_plain_karcher(block):
    base, experts = _experts()
    weights = [1.0, 2.0, 0.5, 1.5]
    uniform = [torch.full_like(base, 3.7)] * len(experts)
    for task_vectors in (False, True):
        plain = merge_tensors("karcher", experts, weights=weights, base=base, block=block, task_vectors=task_vectors)
        pre, trace = fisher_karcher(experts, uniform, weights=weights, base=base, block=block, task_vectors=task_vectors)
        assert torch.allclose(pre, plain, rtol=0, atol=1e-12)
        assert trace.converged


def test_fisher_preconditioning_closed_form():
    """x_1 = e_1, x_2 = e_2 with F̄ = diag(a, b): the scaled points √a e_1 and √b e_2 are orthogonal;
    their equal-weight Karcher direction is (e_1 + e_2)/√2 with the F̄-norm (√a + √b)/2, so mapping back
    gives θ* = (√a + √b)/(2√2) · (1/√a, 1/√b). The Fisher of each expert is averaged with the weights."""
    x1, x2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    f1, f2 = torch.tensor([1.0, 9.0], dtype=torch.float64), torch.tensor([7.0, 3.0], dtype=torch.float64)
    a, b = (f1 + f2).div(2).tolist()  # F̄ = (4, 6)
    merged, _ = fisher_karcher([x1, x2], [f1, f2])
    scale = (math.sqrt(a) + math.sqrt(b)) / (2 * math.sqrt(2))
    assert merged.tolist() == pytest.approx([scale / math.sqrt(a), scale / math.sqrt(b)], rel=1e-12)
    plain = merge_tensors("karcher", [x1, x2])  # what a uniform F̄ gives: the 45° direction, norm 1
    assert plain.tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-12)


def test_fisher_floor_and_bad_fishers():
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    zero = torch.zeros(2)
    # all-zero Fishers: the floor makes F̄ uniform, so the result is plain karcher
    merged, _ = fisher_karcher([x1, x2], [zero, zero])
    assert merged.dtype == torch.float32
    assert torch.allclose(merged, merge_tensors("karcher", [x1, x2]))
    with pytest.raises(ShapeMismatchError, match="Fisher of model 1"):
        fisher_karcher([x1, x2], [zero, torch.zeros(3)])
    with pytest.raises(ParameterError, match="negative"):
        fisher_karcher([x1, x2], [zero, -torch.ones(2)])
    with pytest.raises(ParameterError, match="fisher_floor"):
        fisher_karcher([x1, x2], [zero, zero], fisher_floor=0.0)
    with pytest.raises(ParameterError, match="2 models"):
        fisher_karcher([x1, x2], [zero])
    with pytest.raises(ParameterError, match="unknown"):
        fisher_karcher([x1, x2], [zero, zero], blocks="row")
    with pytest.raises(MissingBaseError):
        fisher_karcher([x1, x2], [zero, zero], task_vectors=True)
