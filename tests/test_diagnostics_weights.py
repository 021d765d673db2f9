"""Weight-space metrics on constructed tensors with closed-form answers."""
import math

import pandas as pd
import pytest
import torch

from karcher_lab import merge_tensors
from karcher_lab.diagnostics.weights import expert_angles, layer_summary, norm_ratios, tensor_norms, weight_metrics
from karcher_lab.errors import ArchitectureMismatchError, EmptyInputError, InputError, ParameterError, WeightError
from karcher_lab.io import Checkpoint

W = "model.layers.0.mlp.up_proj.weight"
V = "model.layers.1.self_attn.q_proj.weight"


def _orthogonal_pair(scale=1.0):
    """Two orthogonal [3, 4] tensors of norm ``scale`` (and a second tensor name, at 60°)."""
    a, b = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    a[0, 0], b[1, 2] = scale, scale
    c, d = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    c[0, 0] = 1.0
    d[0, 0], d[1, 1] = 0.5, math.sqrt(3) / 2
    return {W: a, V: c}, {W: b, V: d}


def _value(table, metric, tensor=W, other=None):
    rows = table[(table["metric"] == metric) & (table["tensor"] == tensor)]
    rows = rows[rows["other"].isna()] if other is None else rows[rows["other"] == other]
    assert len(rows) == 1
    return float(rows["mean"].iloc[0])


def test_linear_merge_of_orthogonal_experts():
    a, b = _orthogonal_pair(scale=2.0)
    linear = {k: (a[k] + b[k]) / 2 for k in a}
    table = weight_metrics(linear, [a, b], names=["a", "b"])
    assert list(table.columns) == ["model", "other", "tensor", "layer", "metric", "mean", "std"]
    assert _value(table, "norm_ratio") == pytest.approx(1 / math.sqrt(2))
    assert _value(table, "chord_radius") == pytest.approx(1 / math.sqrt(2))
    assert _value(table, "chord_geodesic_angle_deg") == pytest.approx(0.0, abs=1e-5)  # two, equal weights
    assert _value(table, "relative_distance", other="a") == pytest.approx(math.sqrt(2) / 2)
    assert _value(table, "angle_deg", other="b") == pytest.approx(45.0)
    assert _value(table, "chord_radius", tensor=V) == pytest.approx(math.cos(math.radians(30)))
    assert table["std"].isna().all()


def test_karcher_merge_keeps_the_norm():
    a, b = _orthogonal_pair(scale=2.0)
    merged = {k: merge_tensors("karcher", [a[k], b[k]]) for k in a}
    table = weight_metrics(merged, [a, b], merged_name="karcher")
    assert _value(table, "norm_ratio") == pytest.approx(1.0)
    assert _value(table, "angle_deg", other="expert_0") == pytest.approx(45.0)
    assert (table["model"] == "karcher").all()


def test_chord_and_geodesic_means_differ_for_unequal_weights():
    """Directions e1 and e2 with weights 1/3 and 2/3: the chord mean points at atan(2) = 63.43° from e1,
    the Karcher mean (minimizing ⅓θ² + ⅔(90° − θ)²) at 60°, so the gap is 3.43°."""
    e1, e2 = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    e1[0], e2[1] = 1.0, 3.0
    experts = [{"model.norm.weight": e1}, {"model.norm.weight": e2}]
    table = weight_metrics({"model.norm.weight": e1 + e2}, experts, weights=[1, 2])
    expected = math.degrees(math.atan(2)) - 60.0
    assert _value(table, "chord_geodesic_angle_deg", tensor="model.norm.weight") == pytest.approx(expected, rel=1e-6)
    assert _value(table, "chord_radius", tensor="model.norm.weight") == pytest.approx(math.sqrt(5) / 3)
    # the norm ratio uses the weighted mean norm: (1·1 + 2·3)/3
    assert _value(table, "norm_ratio", tensor="model.norm.weight") == pytest.approx(math.sqrt(10) / (7 / 3))
    assert table["layer"].isna().all()  # model.norm is outside the decoder blocks


def test_antipodal_experts_have_no_karcher_mean():
    a = {W: torch.ones(3, 4)}
    table = weight_metrics({W: torch.zeros(3, 4)}, [a, {W: -torch.ones(3, 4)}])
    assert _value(table, "chord_radius") == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(_value(table, "chord_geodesic_angle_deg"))


def test_pairwise_and_task_vector_angles():
    a, b = _orthogonal_pair()
    base = {k: torch.full_like(v, 0.25) for k, v in a.items()}
    c = {k: base[k] + (a[k] - b[k]) for k in a}  # task vector a − b
    experts = [{k: base[k] + a[k] for k in a}, {k: base[k] + b[k] for k in a}, c]
    table = expert_angles(experts, base=base, names=["x", "y", "z"])
    tv = table[(table["metric"] == "task_vector_angle_deg") & (table["tensor"] == W)].set_index(["model", "other"])["mean"]
    assert tv[("x", "y")] == pytest.approx(90.0)
    assert tv[("x", "z")] == pytest.approx(45.0)
    assert tv[("y", "z")] == pytest.approx(135.0)
    plain = expert_angles([a, b])
    assert plain.set_index(["tensor", "metric"]).loc[(V, "angle_deg"), "mean"] == pytest.approx(60.0)
    assert len(plain) == 2 and set(plain["metric"]) == {"angle_deg"}


def test_layer_summary():
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.a.weight", "model.layers.0.b.weight", "model.layers.1.a.weight", "lm_head.weight"]
    experts = [{n: torch.randn(5, 5, generator=g) for n in names} for _ in range(3)]
    merged = {n: sum(e[n] for e in experts) / 3 for n in names}
    table = weight_metrics(merged, experts)
    summary = layer_summary(table)
    row = summary[(summary["layer"] == 0) & (summary["metric"] == "norm_ratio")].iloc[0]
    ratios = table[(table["layer"] == 0) & (table["metric"] == "norm_ratio")]["mean"]
    assert row["tensors"] == 2
    assert row["mean"] == pytest.approx(ratios.mean()) and row["std"] == pytest.approx(ratios.std())
    outside = summary[summary["layer"].isna() & (summary["metric"] == "norm_ratio")]
    assert len(outside) == 1 and outside["tensors"].iloc[0] == 1


def test_gpt2_tensor_names_get_their_layer():
    names = ["transformer.h.3.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight"]
    g = torch.Generator().manual_seed(0)
    experts = [{n: torch.randn(4, 4, generator=g) for n in names} for _ in range(2)]
    table = weight_metrics({n: (experts[0][n] + experts[1][n]) / 2 for n in names}, experts)
    layers = table[table["metric"] == "norm_ratio"].set_index("tensor")["layer"]
    assert layers["transformer.h.3.attn.c_attn.weight"] == 3 and layers["transformer.h.0.mlp.c_fc.weight"] == 0
    assert pd.isna(layers["transformer.wte.weight"])


def test_checkpoint_directories(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}")
        LlamaForCausalLM(config).save_pretrained(paths[-1])
    table = weight_metrics(Checkpoint(paths[2]), [Checkpoint(p) for p in paths[:2]])
    in_memory = weight_metrics(
        LlamaForCausalLM.from_pretrained(paths[2]), [LlamaForCausalLM.from_pretrained(p) for p in paths[:2]]
    )
    assert len(table) == len(in_memory) > 0
    assert torch.allclose(torch.tensor(table["mean"].values), torch.tensor(in_memory["mean"].values), equal_nan=True)
    with pytest.raises(InputError, match="open it first"):  # paths are opened by the caller
        weight_metrics(paths[2], paths[:2])


def test_bad_inputs():
    a, b = _orthogonal_pair()
    with pytest.raises(ArchitectureMismatchError):
        weight_metrics(a, [a, {W: torch.zeros(2, 2), V: b[V]}])
    with pytest.raises(EmptyInputError):
        weight_metrics(a, [])
    with pytest.raises(EmptyInputError, match="two"):
        expert_angles([a])
    with pytest.raises(WeightError):
        weight_metrics(a, [a, b], weights=[1.0])
    with pytest.raises(ParameterError, match="distinct"):
        weight_metrics(a, [a, b], names=["x", "x"])


def test_norm_only_equals_the_full_metrics_norm_ratio():
    generator = torch.Generator().manual_seed(0)
    experts = [{W: torch.randn(6, 5, generator=generator), V: torch.randn(4, 4, generator=generator)} for _ in range(3)]
    merged = {k: merge_tensors("linear", [e[k] for e in experts], weights=[0.2, 0.5, 0.3]) for k in experts[0]}
    full = weight_metrics(merged, experts, weights=[0.2, 0.5, 0.3])
    norms = weight_metrics(merged, experts, weights=[0.2, 0.5, 0.3], norm_only=True)
    assert set(norms["metric"]) == {"norm_ratio"} and list(norms.columns) == list(full.columns)
    expected = full[full["metric"] == "norm_ratio"].reset_index(drop=True)
    assert list(norms["tensor"]) == list(expected["tensor"])
    assert torch.allclose(torch.tensor(norms["mean"].values), torch.tensor(expected["mean"].values), rtol=1e-6)
    # closed form: ‖Σ α_i x_i‖ / Σ α_i ‖x_i‖, and a linear merge of non-parallel experts shrinks
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    closed = merged[W].double().norm() / (alpha @ torch.stack([e[W].double().norm() for e in experts]))
    assert _value(norms, "norm_ratio") == pytest.approx(float(closed), rel=1e-6) and float(closed) < 1
    with pytest.raises(ParameterError, match="norm_only"):
        weight_metrics(merged, experts, base=experts[0], norm_only=True)
    # the same rows from norms computed beforehand (the experts' once, as a panel caches them)
    cached = norm_ratios(tensor_norms(merged), [tensor_norms(e) for e in experts], weights=[0.2, 0.5, 0.3])
    pd.testing.assert_frame_equal(cached, norms)
    with pytest.raises(ParameterError, match="no norm of tensor"):
        norm_ratios(tensor_norms(merged), [tensor_norms(e) for e in experts[:2]] + [{W: 1.0}])
    with pytest.raises(EmptyInputError):
        norm_ratios(tensor_norms(merged), [])


def test_tensor_norms_match_a_float64_reference_in_every_dtype():
    from karcher_lab.diagnostics.weights import NORM_CHUNK

    g = torch.Generator().manual_seed(0)
    big = torch.randn(NORM_CHUNK + 4099, generator=g, dtype=torch.float64) * 3.0  # two chunks and a ragged tail
    for dtype, rel in ((torch.float64, 1e-13), (torch.float32, 1e-7), (torch.bfloat16, 1e-7), (torch.float16, 1e-7)):
        x = big.to(dtype)
        exact = float(torch.linalg.vector_norm(x.double()))
        got = tensor_norms({"x": x, "ids": torch.arange(3)})
        assert set(got) == {"x"} and got["x"] == pytest.approx(exact, rel=rel), dtype
