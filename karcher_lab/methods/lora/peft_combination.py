"""peft's own ``add_weighted_adapter`` combinations, run by peft itself, as LoRA merge methods.

For comparison with the methods of this package, ``peft_<type>`` hands one module's factors to peft:
a one-layer ``nn.Linear(d2, d1)`` holder gets one LoRA adapter per input (lora_B = G_i, lora_A = H_iᵀ,
lora_alpha = r_i so s = 1), ``LoraModel.add_weighted_adapter(..., combination_type=<type>)`` builds
the merged adapter, and its factors are read back as (s B, Aᵀ). peft's semantics (peft ≥ 0.21):

- ``cat``: ΔW = Σ w_i ΔW_i exactly (rank Σ r_i);
- ``linear``: A = Σ √w_i A_i and B = Σ √w_i B_i, i.e. an average of the *factors*, which depends on the
  representatives (G_i, H_i) and not only on ΔW_i (equal ranks);
- ``svd``: Σ w_i ΔW_i truncated to rank ``svd_rank`` (default the largest input rank) by SVD;
- ``ties`` (on A and B separately, equal ranks) and ``ties_svd`` (on ΔW, then SVD): peft's TIES, which
  trims with ``density``, elects signs with ``majority_sign_method`` and divides by the number of
  agreeing adapters (not by their weights, unlike mergekit's).

Since the inputs carry their scaling inside G_i, ``linear`` and ``ties`` see the factors (s B_i, A_i)
rather than peft's (B_i, A_i) with s applied to the weights; for adapters of equal scaling the merged
update is the same.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.lora.registry import register_lora
from karcher_lab.methods.registry import Param

DENSITY = Param("density", float, 1.0, low=0.0, high=1.0, doc="fraction of entries kept by peft's trim")
MAJORITY = Param("majority_sign_method", str, "total", choices=("total", "frequency"), doc="peft's sign election")
SVD_RANK = Param("svd_rank", int, 0, low=0, doc="rank of the SVD result (0: the largest input rank)")


class _Holder(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype)


def peft_combine(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor, combination_type: str,
                 **options) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``add_weighted_adapter(combination_type)`` on one module's factors; returns (s B, Aᵀ)."""
    import peft

    g0, h0 = pairs[0]
    holder = _Holder(h0.shape[0], g0.shape[0], g0.dtype)
    names = [f"input{i}" for i in range(len(pairs))]
    model = None
    for name, (g, h) in zip(names, pairs):
        config = peft.LoraConfig(r=g.shape[1], lora_alpha=g.shape[1], target_modules=["proj"], lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(holder, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(h.T)
            layer.lora_B[name].weight.copy_(g)
    model.base_model.add_weighted_adapter(names, [float(w) for w in weights], "merged",
                                          combination_type=combination_type, **options)
    layer = model.base_model.model.proj
    a, b = layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach()
    return (b * layer.scaling["merged"]).clone(), a.T.clone()


def _register(kind: str, summary: str, rank: str, params: tuple[Param, ...], equal_ranks: bool) -> None:
    def merge(pairs, *, weights: torch.Tensor, name: str | None = None, **params):
        options = dict(params)
        if "svd_rank" in options:
            options["svd_rank"] = options["svd_rank"] or None
        return peft_combine(pairs, weights, kind, **options)

    merge.__name__ = merge.__qualname__ = f"peft_{kind}"
    merge.__doc__ = f"peft's add_weighted_adapter(combination_type={kind!r}): {summary}."
    register_lora(f"peft_{kind}", summary=f"peft {kind}: {summary}", rank=rank, params=params,
                  equal_ranks=equal_ranks, weights="any", paper="peft (Mangrulkar et al.), LoraModel.add_weighted_adapter"
                  )(merge)


_register("cat", "Σ wi ΔWi exactly, factors concatenated", "Σ r_i", (), False)
_register("linear", "factor averaging, A = Σ √wi Ai, B = Σ √wi Bi", "r", (), True)
_register("svd", "Σ wi ΔWi truncated by SVD", "svd_rank (default max r_i)", (SVD_RANK,), False)
_register("ties", "peft's TIES on A and on B separately", "r", (DENSITY, MAJORITY), True)
_register("ties_svd", "peft's TIES on ΔW, truncated by SVD", "svd_rank (default max r_i)",
          (DENSITY, MAJORITY, SVD_RANK), False)
