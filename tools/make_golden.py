#!/usr/bin/env python3
"""Golden fixtures from the peer: mergekit's own merge methods run on small seeded inputs.

    python3 tools/make_golden.py        # rewrites tests/golden/*.safetensors

mergekit is never imported by karcher_lab or its tests. This script finds (or creates) the throw-away
peer environment of ``tools/peer_env.py`` and re-runs itself there with ``--in-peer``; in that mode it
calls mergekit's tensor-level entry point, ``mergekit.merge_methods.merge_tensors(tensors, method,
parameters=..., base_index=..., dtype=...)``, which binds parameters exactly as a mergekit YAML does
(per-model values in model order, defaults filled) and then runs the method's own kernel.

Files written (read by tests/test_golden.py):

- ``inputs.safetensors``: input sets, ``<set>/base`` and ``<set>/model<i>``, stored in the set's dtype.
  A case uses the base (when it has one) and the first ``n_models`` models of its set.
- ``<method>.safetensors``: per case ``<case>/output``, mergekit's result in the inputs' dtype (for bf16
  inputs mergekit computes in bf16, as in a real bf16 merge), and for bf16 cases also
  ``<case>/output_f32``, mergekit run on the same bf16 inputs with ``dtype=torch.float32``. Metadata: one
  key, ``golden``, a JSON object with ``method``, ``mergekit_version``, ``torch_version`` and ``cases``
  (a list of: id, method, inputs, n_models, base, params in mergekit's YAML names, dtype, seed, note,
  and ``mergekit_error``, the exception mergekit raised, for cases that have no output).

Randomized methods (dare_*, della*) draw from torch's global generator: ``torch.manual_seed(seed)`` is
called right before each mergekit call, and ``seed`` is recorded with the case.

Top-k selections (ties' magnitude pruning, breadcrumbs, sce's variance selection) are ambiguous when
two values tie at the cut (argsort order among equal keys is unspecified), which happens readily in
bf16. Input sets used by such cases are re-drawn with the next seed until no cut has a tie, in either
compute dtype, so the fixtures pin behaviour rather than sort order.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "tests" / "golden"

SHAPES = {"vec": (64,), "mat": (24, 32), "cube": (4, 6, 8), "big": (48, 64), "col": (16, 1)}
BASE_STD = 0.03
DELTA_STD = 0.02


# --------------------------------------------------------------------------------------------------
# Case list (plain data; no torch needed).

def _case(method, inputs, n_models, base, params=None, seed=None, note="", deviation=None):
    """One fixture case. ``deviation`` names a documented karcher_lab deviation the case exercises
    (tests/test_golden.py asserts the difference instead of agreement)."""
    return {
        "method": method,
        "inputs": inputs,
        "n_models": n_models,
        "base": base,
        "params": params or {},
        "seed": seed,
        "note": note,
        "deviation": deviation,
    }


def input_set(kind, shape, dtype, seed=0):
    """Name of an input set: kind of structure, shape key, dtype and draw seed."""
    return f"{kind}-{shape}-{dtype}-s{seed}"


def cases() -> list[dict]:
    def g(shape, dtype, seed=0):
        return input_set("generic", shape, dtype, seed)

    # bf16 cases with top-k cuts get their own draws (see _resolve_input_sets); fewer cases per set
    # means fewer re-draws.
    out: list[dict] = []
    add = out.append

    # linear: no base; normalize (default true) divides by the weight sum.
    add(_case("linear", g("vec", "f32"), 2, False, {"weight": [0.3, 0.7]}))
    add(_case("linear", g("mat", "f32"), 3, False, {"weight": [1.0, 2.0, 3.0]}))
    add(_case("linear", g("cube", "f32"), 5, False, {"weight": [1.0] * 5}))
    add(_case("linear", g("mat", "f32"), 3, False, {"weight": [0.5, 0.25, 0.75], "normalize": False}))
    add(_case("linear", g("vec", "bf16"), 2, False, {"weight": [1.0, 3.0]}))
    add(_case("linear", g("mat", "bf16"), 5, False, {"weight": [0.1, 0.2, 0.3, 0.2, 0.2]}))
    add(_case("linear", g("cube", "bf16"), 3, False, {"weight": [2.0, 1.0, 1.0], "normalize": False}))
    add(_case("linear", g("vec", "f32"), 2, False, {"weight": [1.0, -1.0]},
              note="weights summing to zero with normalize: mergekit divides by 0",
              deviation="linear_cancelling_weights"))

    # slerp: base_model is the t = 0 end, the other model the t = 1 end.
    add(_case("slerp", g("vec", "f32"), 1, True, {"t": 0.3}))
    add(_case("slerp", g("mat", "f32"), 1, True, {"t": 0.5}))
    add(_case("slerp", g("cube", "f32"), 1, True, {"t": 0.85}))
    add(_case("slerp", g("mat", "f32"), 1, True, {"t": 0.0}, note="t = 0 returns the base"))
    add(_case("slerp", g("mat", "f32"), 1, True, {"t": 1.0}, note="t = 1 returns the model"))
    add(_case("slerp", g("vec", "bf16"), 1, True, {"t": 0.25}))
    add(_case("slerp", g("mat", "bf16"), 1, True, {"t": 0.6}))
    add(_case("slerp", input_set("parallel", "vec", "f32"), 1, True, {"t": 0.4},
              note="parallel inputs: |cos| > 0.9995 falls back to lerp"))
    add(_case("slerp", input_set("antipodal", "vec", "f32"), 1, True, {"t": 0.3},
              note="antipodal inputs: mergekit falls back to lerp"))
    add(_case("slerp", input_set("zerobase", "vec", "f32"), 1, True, {"t": 0.5},
              note="zero base: mergekit treats it as orthogonal to the model, giving sin(t pi/2) theta_1",
              deviation="slerp_zero_tensor"))

    # nuslerp: t = w2 / (w1 + w2); optional base turns it into slerp of task vectors.
    add(_case("nuslerp", g("mat", "f32"), 2, False, {"weight": [1.0, 3.0]}))
    add(_case("nuslerp", g("vec", "f32"), 2, False, {"weight": [0.5, 0.5]}))
    add(_case("nuslerp", g("cube", "f32"), 2, True, {"weight": [2.0, 1.0]}))
    add(_case("nuslerp", g("mat", "f32"), 2, True, {"weight": [1.0, 1.0], "nuslerp_flatten": False},
              note="one slerp per last-dimension row"))
    add(_case("nuslerp", g("mat", "f32"), 2, False,
              {"weight": [3.0, 2.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
              note="one slerp per column (vectors along dim 0)"))
    add(_case("nuslerp", g("cube", "f32"), 2, False,
              {"weight": [1.0, 2.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
              note="3-D with row_wise: vectors along dim 0 (transpose 0 <-> -1)"))
    add(_case("nuslerp", g("cube", "f32"), 2, False, {"weight": [1.0, 2.0], "nuslerp_flatten": False}))
    add(_case("nuslerp", g("mat", "bf16"), 2, False, {"weight": [1.0, 2.0]}))
    add(_case("nuslerp", g("vec", "bf16"), 2, True, {"weight": [1.0, 1.0]}))
    add(_case("nuslerp", input_set("parallel", "vec", "f32"), 2, False, {"weight": [1.0, 1.0]},
              note="colinear inputs fall back to lerp"))
    add(_case("nuslerp", input_set("untouched", "mat", "f32"), 2, True, {"weight": [1.0, 1.0]},
              note="model 0 equals the base: a zero task vector, which mergekit treats as orthogonal",
              deviation="nuslerp_zero_task_vector"))
    add(_case("nuslerp", g("mat", "f32"), 2, False, {"weight": [1e-7, 3e-7]},
              note="weight sum below 1e-6: mergekit uses t = 0.5 instead of w2 / (w1 + w2)",
              deviation="nuslerp_tiny_weight_sum"))

    # multislerp: one tangent-space step at the normalized weighted chord mean.
    add(_case("multislerp", g("vec", "f32"), 2, False, {"weight": [1.0, 2.0]}))
    add(_case("multislerp", g("mat", "f32"), 3, False, {"weight": [1.0, 1.0, 1.0]}))
    add(_case("multislerp", g("cube", "f32"), 5, False, {"weight": [0.1, 0.2, 0.3, 0.2, 0.2]}))
    add(_case("multislerp", g("mat", "f32"), 3, True, {"weight": [1.0, 2.0, 1.0]}))
    add(_case("multislerp", g("mat", "f32"), 5, True, {"weight": [1.0] * 5}))
    add(_case("multislerp", g("mat", "f32"), 3, False, {"weight": [0.2, 0.3, 0.1], "normalize_weights": False}))
    add(_case("multislerp", g("mat", "bf16"), 3, False, {"weight": [1.0, 2.0, 3.0]}))
    add(_case("multislerp", g("vec", "bf16"), 2, True, {"weight": [1.0, 1.0]}))
    add(_case("multislerp", input_set("antipodal", "vec", "f32"), 2, False, {"weight": [1.0, 1.0]},
              note="antipodal pair, equal weights: mergekit means to fall back to the linear combination, but "
                   "float32 rounding leaves the unit-vector sum above eps, so it normalizes rounding noise",
              deviation="multislerp_antipodal_pair"))
    add(_case("multislerp", input_set("unchanged", "vec", "f32"), 3, True, {"weight": [1.0, 1.0, 1.0]},
              note="every model equals the base: all task vectors are zero",
              deviation="multislerp_zero_task_vectors"))

    # karcher: mergekit ignores weights (alpha = 1/N); step 1, max_iter 10, tol 1e-5 by default.
    kd = {"max_iter": 10, "tol": 1e-5}
    add(_case("karcher", g("vec", "f32"), 2, False, kd))
    add(_case("karcher", g("mat", "f32"), 3, False, kd))
    add(_case("karcher", g("cube", "f32"), 5, False, kd))
    add(_case("karcher", g("mat", "f32"), 5, False, kd))
    add(_case("karcher", g("mat", "f32"), 5, False, {"max_iter": 2, "tol": 1e-5},
              note="stopped after two iterations, before convergence"))
    add(_case("karcher", g("mat", "f32"), 3, False, {"max_iter": 10, "tol": 1e-3}))
    add(_case("karcher", g("vec", "bf16"), 2, False, kd))
    add(_case("karcher", g("mat", "bf16"), 3, False, kd))
    add(_case("karcher", g("cube", "bf16"), 5, False, kd))
    add(_case("karcher", input_set("zero", "mat", "f32"), 3, False, kd,
              note="model 2 is all zeros: no direction, but its zero norm enters the mean norm",
              deviation="karcher_zero_model_norm"))
    add(_case("karcher", input_set("parallel", "vec", "f32"), 2, False, kd,
              note="parallel inputs: the mean direction is theirs, the norm their mean norm"))
    add(_case("karcher", input_set("antipodal", "vec", "f32"), 2, False, kd,
              note="antipodal pair: mergekit returns model 0's direction times the mean norm",
              deviation="karcher_antipodal"))

    # task arithmetic: base + lambda * sum w_i delta_i (divided by sum w when normalize).
    add(_case("task_arithmetic", g("vec", "f32"), 1, True, {"weight": [0.7]}))
    add(_case("task_arithmetic", g("mat", "f32"), 2, True, {"weight": [1.0, 0.5]}))
    add(_case("task_arithmetic", g("cube", "f32"), 3, True, {"weight": [1.0, -0.5, 0.25], "lambda": 1.5}))
    add(_case("task_arithmetic", g("mat", "f32"), 5, True, {"weight": [0.2] * 5, "normalize": True}))
    add(_case("task_arithmetic", g("mat", "f32"), 3, True, {"weight": [1.0, -1.0, 0.5], "normalize": True, "lambda": 0.5},
              note="normalize with a weight sum of 0.5"))
    add(_case("task_arithmetic", g("mat", "bf16"), 3, True, {"weight": [0.3, 0.3, 0.4]}))
    add(_case("task_arithmetic", g("vec", "bf16"), 2, True, {"weight": [1.0, 1.0], "lambda": 0.8}))

    # ties: magnitude top-k per model, sign election on weighted deltas, disjoint mean.
    add(_case("ties", g("vec", "f32"), 2, True, {"weight": [1.0, 1.0], "density": 0.5}))
    add(_case("ties", g("mat", "f32"), 3, True, {"weight": [1.0, 0.5, 0.8], "density": [0.3, 0.7, 0.5]}))
    add(_case("ties", g("cube", "f32"), 5, True, {"weight": [1.0] * 5, "density": 0.2}))
    add(_case("ties", g("mat", "f32"), 3, True, {"weight": [0.6, 0.3, 0.6], "density": 0.4, "normalize": False, "lambda": 1.3}))
    add(_case("ties", g("mat", "f32"), 2, True, {"weight": [1.0, 2.0], "density": 1.0},
              note="density 1: no pruning, sign election only"))
    add(_case("ties", g("mat", "f32"), 3, True, {"weight": [1.0, 1.0, 1.0], "density": 0.5, "int8_mask": True}))
    add(_case("ties", g("vec", "f32"), 1, True, {"weight": [0.9], "density": 0.25}))
    add(_case("ties", g("vec", "bf16", 100), 3, True, {"weight": [1.0, 0.5, 1.0], "density": 0.5}))
    add(_case("ties", g("mat", "bf16", 100), 2, True, {"weight": [1.0, 1.0], "density": [0.3, 0.6]}))

    # dare (random): Bernoulli(density) masks, L1-norm rescale.
    for method in ("dare_linear", "dare_ties"):
        add(_case(method, g("vec", "f32"), 2, True, {"weight": [1.0, 1.0], "density": 0.5}, seed=11))
        add(_case(method, g("mat", "f32"), 3, True, {"weight": [1.0, 0.5, 0.8], "density": [0.3, 0.7, 0.5]}, seed=12))
        add(_case(method, g("cube", "f32"), 5, True, {"weight": [1.0] * 5, "density": 0.4}, seed=13))
        add(_case(method, g("mat", "f32"), 2, True, {"weight": [1.0, 1.0], "density": [1.0, 0.5]}, seed=14,
                  note="model 0 at density 1 draws no random numbers"))
        add(_case(method, g("mat", "f32"), 3, True, {"weight": [1.0, 1.0, 1.0], "density": 0.5, "rescale": False}, seed=15))
        add(_case(method, g("mat", "f32"), 2, True, {"weight": [0.5, 0.5], "density": 0.6, "normalize": True, "lambda": 0.7}, seed=16))
        add(_case(method, g("big", "f32"), 1, True, {"weight": [1.0], "density": 0.3}, seed=17,
                  note="one model: the mask and the rescale factor are readable from the output"))
        add(_case(method, g("mat", "bf16"), 3, True, {"weight": [1.0, 1.0, 1.0], "density": 0.5}, seed=18))
        add(_case(method, g("big", "bf16"), 1, True, {"weight": [1.0], "density": 0.3}, seed=19))

    # della (random): rank-dependent keep probability per row (dim 1), L1 rescale.
    for method in ("della", "della_linear"):
        add(_case(method, g("mat", "f32"), 2, True, {"weight": [1.0, 1.0], "density": 0.5, "epsilon": 0.1}, seed=21))
        add(_case(method, g("vec", "f32"), 3, True, {"weight": [1.0, 0.5, 1.0], "density": [0.4, 0.6, 0.5], "epsilon": 0.15}, seed=22,
                  note="1-D: the whole vector is one row"))
        add(_case(method, g("cube", "f32"), 3, True, {"weight": [1.0, 1.0, 1.0], "density": 0.5, "epsilon": 0.2}, seed=23,
                  note="3-D: ranks are taken along dim 1"))
        add(_case(method, g("mat", "f32"), 5, True, {"weight": [1.0] * 5, "density": 0.3, "epsilon": 0.1, "lambda": 1.2}, seed=24))
        add(_case(method, g("big", "f32"), 1, True, {"weight": [1.0], "density": 0.5, "epsilon": 0.3}, seed=25,
                  note="one model: the mask is readable from the output"))
        add(_case(method, g("mat", "bf16"), 2, True, {"weight": [1.0, 1.0], "density": 0.5, "epsilon": 0.1}, seed=26))
        add(_case(method, g("col", "f32"), 1, True, {"weight": [1.0], "density": 0.5, "epsilon": 0.1}, seed=27,
                  note="rows of one entry: mergekit's rank normalization is 0/0",
                  deviation="della_single_entry_rows"))

    # breadcrumbs: drop the top int(gamma n) outliers and the smallest, keeping int(density n).
    for method, bc_seed in (("breadcrumbs", 200), ("breadcrumbs_ties", 300)):
        add(_case(method, g("mat", "f32"), 2, True, {"weight": [1.0, 1.0], "density": 0.8, "gamma": 0.05}))
        add(_case(method, g("mat", "f32"), 3, True, {"weight": [1.0, 0.5, 1.0], "density": [0.5, 0.7, 0.9], "gamma": [0.01, 0.05, 0.02]}))
        add(_case(method, g("vec", "f32"), 2, True, {"weight": [1.0, 1.0], "density": 0.5},
                  note="default gamma 0.01 on 64 elements: int(gamma n) = 0 outliers removed"))
        add(_case(method, g("cube", "f32"), 5, True, {"weight": [1.0] * 5, "density": 0.6, "gamma": 0.1}))
        add(_case(method, g("mat", "f32"), 2, True, {"weight": [1.0, 1.0], "density": 0.9, "gamma": 0.2},
                  note="n - int(density n) < int(gamma n): fewer outliers removed, the smallest kept"))
        add(_case(method, g("mat", "f32"), 2, True, {"weight": [1.0, 1.0], "density": 1.0, "gamma": 0.1},
                  note="density 1 returns the delta untouched, gamma notwithstanding"))
        add(_case(method, g("vec", "bf16", bc_seed), 2, True, {"weight": [1.0, 1.0], "density": 0.7, "gamma": 0.05}))
        add(_case(method, g("mat", "bf16", bc_seed), 3, True, {"weight": [1.0, 1.0, 1.0], "density": 0.6, "gamma": 0.03}))

    # sce: variance top-k selection, unweighted sign election, matrix-level weights.
    add(_case("sce", g("vec", "f32"), 2, True))
    add(_case("sce", g("mat", "f32"), 3, True, {"select_topk": 0.5}))
    add(_case("sce", g("cube", "f32"), 5, True, {"select_topk": 0.1}))
    add(_case("sce", g("mat", "f32"), 5, True, {"select_topk": 1.0}))
    add(_case("sce", g("mat", "f32"), 1, True, {"select_topk": 0.3}))
    add(_case("sce", input_set("tiny", "mat", "f32"), 3, True, {"select_topk": 0.7},
              note="sum of mean squared deltas < 1e-6: uniform matrix weights"))
    add(_case("sce", g("mat", "bf16", 400), 3, True, {"select_topk": 0.6}))
    add(_case("sce", g("cube", "bf16"), 2, True))

    # model_stock: t = N c / (1 + (N - 1) c) from the mean pairwise cosine c of the deltas.
    add(_case("model_stock", input_set("stock", "mat", "f32"), 2, True))
    add(_case("model_stock", input_set("stock", "mat", "f32"), 3, True))
    add(_case("model_stock", input_set("stock", "cube", "f32"), 5, True))
    add(_case("model_stock", input_set("stock", "vec", "f32"), 3, True, {"filter_wise": True}))
    add(_case("model_stock", input_set("stock", "mat", "f32"), 3, True, {"filter_wise": True}))
    add(_case("model_stock", input_set("stock", "mat", "bf16"), 3, True))
    add(_case("model_stock", g("mat", "f32"), 2, True, note="nearly orthogonal deltas, c = +0.033: t near 0"))
    add(_case("model_stock", g("mat", "f32"), 3, True, note="nearly orthogonal deltas, c = -0.025: t slightly below 0",
              deviation="model_stock_negative_cosine"))
    add(_case("model_stock", input_set("opposed", "mat", "f32"), 2, True,
              note="cos(delta_1, delta_2) < 0: t < 0, extrapolating past the base",
              deviation="model_stock_negative_cosine"))
    add(_case("model_stock", input_set("opposed", "mat", "f32"), 3, True,
              note="three deltas about 120 degrees apart: t far below 0",
              deviation="model_stock_negative_cosine"))
    add(_case("model_stock", input_set("opposed", "mat", "f32"), 3, True, {"filter_wise": True},
              note="per-row t, all negative",
              deviation="model_stock_negative_cosine"))

    # arcee_fusion: importance |theta_1 - theta_0| * KL(softmax rows); keep where >= median + 1.5 IQR.
    add(_case("arcee_fusion", g("vec", "f32"), 1, True))
    add(_case("arcee_fusion", g("mat", "f32"), 1, True))
    add(_case("arcee_fusion", g("cube", "f32"), 1, True))
    add(_case("arcee_fusion", input_set("wide", "mat", "f32"), 1, True, note="larger deltas: KL varies by row"))
    add(_case("arcee_fusion", input_set("wide", "mat", "bf16"), 1, True))

    # nearswap: w = clamp(t / |theta_0 - theta_1|, 0, 1).
    add(_case("nearswap", g("vec", "f32"), 1, True, {"t": 0.01}))
    add(_case("nearswap", g("mat", "f32"), 1, True, {"t": 0.001}))
    add(_case("nearswap", g("cube", "f32"), 1, True, {"t": 1.0}))
    add(_case("nearswap", g("mat", "bf16"), 1, True, {"t": 0.02}))

    # ram: entries above epsilon are active; shared entries averaged, unique ones kept.
    sp = lambda shape, dtype: input_set("sparse", shape, dtype)  # noqa: E731
    add(_case("ram", sp("vec", "f32"), 2, True))
    add(_case("ram", sp("mat", "f32"), 3, True))
    add(_case("ram", sp("cube", "f32"), 5, True))
    add(_case("ram", sp("mat", "f32"), 3, True, {"epsilon": 0.01}))
    add(_case("ram", sp("mat", "bf16"), 3, True))
    add(_case("ram", sp("vec", "bf16"), 2, True, {"epsilon": 0.005}))

    # ramplus_tl: RAM with unique entries of model i boosted by 1 + r clip(shared_i / unique_i, 0, alpha).
    add(_case("ramplus_tl", sp("vec", "f32"), 2, True))
    add(_case("ramplus_tl", sp("mat", "f32"), 3, True, {"r": 0.5, "alpha": 0.8}))
    add(_case("ramplus_tl", sp("cube", "f32"), 5, True, {"epsilon": 0.01, "r": 0.3}))
    add(_case("ramplus_tl", sp("mat", "bf16"), 3, True, {"r": 0.2, "alpha": 0.5}))
    add(_case("ramplus_tl", input_set("untouched", "mat", "f32"), 2, True, {"epsilon": 0.0},
              note="epsilon 0 and a model equal to the base: no active entries, 0/0 in mergekit's ratio",
              deviation="ramplus_no_unique_entries"))
    return out


# --------------------------------------------------------------------------------------------------
# Everything below runs inside the peer environment.

def _draw(name: str):
    """The tensors of input set ``name`` as float64 (base, [models]) before the cast to its dtype."""
    import torch

    kind, shape_key, _dtype, seed = name.split("-")
    shape = SHAPES[shape_key]
    g = torch.Generator().manual_seed(hash_seed(kind, shape_key, int(seed[1:])))
    randn = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    base = BASE_STD * randn()
    n = 5
    if kind == "generic":
        models = [base + DELTA_STD * randn() for _ in range(n)]
    elif kind == "wide":
        models = [base + 10 * DELTA_STD * randn() for _ in range(n)]
    elif kind == "tiny":
        models = [base + 2e-4 * randn() for _ in range(n)]
    elif kind == "sparse":
        models = [base + DELTA_STD * randn() * (torch.rand(shape, generator=g) < 0.5) for _ in range(n)]
    elif kind == "stock":
        shared = randn()
        models = [base + DELTA_STD * (0.7 * shared + 0.7 * randn()) for _ in range(n)]
    elif kind == "opposed":
        a, b = randn(), randn()
        models = [
            base + DELTA_STD * (math.cos(2 * math.pi * k / 3) * a + math.sin(2 * math.pi * k / 3) * b + 0.3 * randn())
            for k in range(n)
        ]
    elif kind == "parallel":
        models = [2.0 * base, 0.5 * base] + [base + DELTA_STD * randn() for _ in range(n - 2)]
    elif kind == "antipodal":
        models = [-base, 2.0 * base] + [base + DELTA_STD * randn() for _ in range(n - 2)]
    elif kind == "zerobase":
        base = torch.zeros(shape, dtype=torch.float64)
        models = [DELTA_STD * randn() for _ in range(n)]
    elif kind == "untouched":
        models = [base.clone()] + [base + DELTA_STD * randn() for _ in range(n - 1)]
    elif kind == "unchanged":
        models = [base.clone() for _ in range(n)]
    elif kind == "zero":
        models = [base + DELTA_STD * randn() for _ in range(2)] + [torch.zeros(shape, dtype=torch.float64)]
        models += [base + DELTA_STD * randn() for _ in range(n - 3)]
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return base, models


def hash_seed(kind: str, shape_key: str, seed: int) -> int:
    """A stable integer seed per (kind, shape, draw) so sets do not share random streams."""
    return (sum((i + 1) * ord(c) for i, c in enumerate(f"{kind}/{shape_key}")) * 1009 + seed) % (2**31)


def _load_set(name: str) -> dict:
    import torch

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[name.split("-")[2]]
    base, models = _draw(name)
    return {"base": base.to(dtype), "models": [m.to(dtype) for m in models]}


def _resolve_input_sets(all_cases: list[dict]) -> dict[str, dict]:
    """Draw every input set; re-draw (next seed) a set while any case using it has a tied top-k cut."""
    import torch

    sets: dict[str, dict] = {}
    requested = sorted({c["inputs"] for c in all_cases})
    for wanted in requested:
        users = [c for c in all_cases if c["inputs"] == wanted]
        kind, shape_key, dtype_key, seed = wanted.split("-")
        draw = int(seed[1:])
        while True:
            name = input_set(kind, shape_key, dtype_key, draw)
            s = _load_set(name)
            problems = [
                f"{c['method']}: {p}"
                for c in users
                for cd in {s["base"].dtype, torch.float32}
                for p in _ambiguous_cuts(c, s["base"], s["models"], cd)
            ]
            if not problems:
                break
            print(f"  {name}: tied cut ({'; '.join(problems)}); re-drawing", flush=True)
            draw += 1
        sets[name] = s
        for c in users:
            c["inputs"] = name
    return sets


def _ambiguous_cuts(case: dict, base, models, compute_dtype) -> list[str]:
    """Top-k cuts of this case that fall between two equal keys (see the module docstring)."""
    import torch

    method, params = case["method"], case["params"]
    n = case["n_models"]
    b = base.to(compute_dtype)
    deltas = [m.to(compute_dtype) - b for m in models[:n]]

    def per_model(key: str, default: float) -> list[float]:
        value = params.get(key, default)
        return value if isinstance(value, list) else [value] * n

    def tie(values_ascending, pos) -> bool:  # keys at pos - 1 and pos equal
        return 0 < pos < values_ascending.numel() and bool(values_ascending[pos - 1] == values_ascending[pos])

    problems = []
    if method == "ties":
        for i, (d, rho) in enumerate(zip(deltas, per_model("density", 1.0))):
            if rho < 1:
                asc = d.abs().float().flatten().sort().values
                k = max(1, int(rho * d.numel()))
                if tie(asc, d.numel() - k):
                    problems.append(f"model {i} top-{k}")
    elif method.startswith("breadcrumbs"):
        for i, (d, rho, gamma) in enumerate(zip(deltas, per_model("density", 1.0), per_model("gamma", 0.01))):
            if rho < 1:
                asc = d.abs().float().flatten().sort().values
                n_el = d.numel()
                target, n_top = int(rho * n_el), int(gamma * n_el)
                n_bot = max(0, n_el - target - n_top)
                if tie(asc, n_bot) or tie(asc, n_bot + target):
                    problems.append(f"model {i} band [{n_bot}, {n_bot + target})")
    elif method == "sce" and params.get("select_topk", 1.0) < 1:
        var = torch.var(torch.stack(deltas), dim=0, unbiased=False).abs().flatten()
        k = int(torch.count_nonzero(var) * params["select_topk"])
        asc = var.float().sort().values
        if tie(asc, var.numel() - k):
            problems.append(f"variance top-{k}")
    return problems


def _run_mergekit(case: dict, base, models, dtype=None):
    import torch
    from mergekit.merge_methods import merge_tensors

    tensors = ([base] if case["base"] else []) + list(models[: case["n_models"]])
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    return merge_tensors(
        tensors,
        case["method"],
        parameters=case["params"],
        base_index=0 if case["base"] else None,
        dtype=dtype,
    )


def generate(out_dir: Path) -> None:
    import importlib.metadata

    import torch
    from safetensors.torch import save_file

    all_cases = cases()
    sets = _resolve_input_sets(all_cases)

    per_method: dict[str, list[dict]] = {}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for case in all_cases:
        method = case["method"]
        index = len(per_method.setdefault(method, []))
        case["id"] = f"{method}-{index:02d}"
        case["dtype"] = case["inputs"].split("-")[2]
        s = sets[case["inputs"]]
        tensors = outputs.setdefault(method, {})
        per_method[method].append(case)
        try:
            result = _run_mergekit(case, s["base"], s["models"])
        except Exception as error:  # recorded: a case where mergekit fails
            case["mergekit_error"] = f"{type(error).__name__}: {error}"
            print(f"  {case['id']}: mergekit raised {case['mergekit_error']}", flush=True)
            continue
        # Stored in the inputs' dtype, as a merge saves it (arcee_fusion returns float32 for bf16 inputs).
        tensors[f"{case['id']}/output"] = result.to(s["base"].dtype).contiguous()
        if case["dtype"] == "bf16":
            tensors[f"{case['id']}/output_f32"] = _run_mergekit(case, s["base"], s["models"], torch.float32).contiguous()
            f32 = tensors[f"{case['id']}/output_f32"]
            scale = max(float(s["base"].float().abs().max()), float(f32.abs().max()))
            err = float((result.float() - f32.to(result.dtype).float()).abs().max()) / scale
            print(f"  {case['id']}: mergekit bf16 compute vs f32 compute, max err / scale = {err:.2e}", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    versions = {
        "mergekit_version": importlib.metadata.version("mergekit"),
        "torch_version": torch.__version__,
    }
    inputs = {}
    for name, s in sets.items():
        inputs[f"{name}/base"] = s["base"].contiguous()
        for i, m in enumerate(s["models"]):
            inputs[f"{name}/model{i}"] = m.contiguous()
    # One metadata key: safetensors writes several keys in arbitrary order, one keeps files byte-stable.
    save_file(inputs, str(out_dir / "inputs.safetensors"), metadata={"golden": json.dumps(versions)})
    for method, method_cases in per_method.items():
        metadata = {"golden": json.dumps(dict(versions, method=method, cases=method_cases))}
        save_file(outputs[method], str(out_dir / f"{method}.safetensors"), metadata=metadata)
    total = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    print(f"{len(all_cases)} cases, {len(sets)} input sets, {total / 1e6:.2f} MB in {out_dir}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--in-peer"]:
        generate(Path(argv[1]))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_env import ensure_peer_python

    python = ensure_peer_python()
    subprocess.run([str(python), str(Path(__file__).resolve()), "--in-peer", str(GOLDEN_DIR)], check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
