"""Merging large tensors by row slices (methods.api.RowSlices, pipeline.execute.SLICE_INPUT_BYTES), reading
rows from checkpoints (Source.load_rows), and combine leaving zero-coefficient inputs unread."""
from __future__ import annotations

import pytest
import torch

import karcher_lab
from karcher_lab.errors import NonFiniteError, NotSupportedError
from karcher_lab.geometry.karcher_mean import combine
from karcher_lab.io.checkpoint import Checkpoint, StateDictSource
from karcher_lab.methods.api import RowSlices, merge_tensors, row_separable
from karcher_lab.pipeline import execute


def _models(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"embed.weight": torch.randn(1000, 64, generator=g).to(torch.bfloat16),
             "w": torch.randn(300, 8, generator=g, dtype=torch.float64).float(),
             "b": torch.randn(10, generator=g)} for _ in range(n)]


@pytest.fixture
def sliced(monkeypatch):
    """Every tensor above 20 kB of inputs is merged by row slices; records (name, rows, step) per tensor."""
    monkeypatch.setattr(execute, "SLICE_INPUT_BYTES", 20_000)
    calls = []
    original = execute._row_slices

    def spy(plan, task, *args):
        rows = original(plan, task, *args)
        calls.append((task.name, None if rows is None else (rows.rows, rows.step)))
        return rows

    monkeypatch.setattr(execute, "_row_slices", spy)
    return calls


@pytest.mark.parametrize("params", [{}, {"block": "column"}, {"task_vectors": True}, {"eta": 0.5, "init": "first"}])
def test_a_sliced_karcher_merge_equals_the_whole_tensor_merge(params, monkeypatch):
    models = _models()
    base = _models(1, seed=9)[0] if params.get("task_vectors") else None
    whole = karcher_lab.merge(models, "karcher", weights=[1, 2, 3, 0.5], base=base, params=params)
    monkeypatch.setattr(execute, "SLICE_INPUT_BYTES", 20_000)
    sliced = karcher_lab.merge(models, "karcher", weights=[1, 2, 3, 0.5], base=base, params=params)
    for name, tensor in whole.items():
        assert sliced[name].dtype == tensor.dtype
        torch.testing.assert_close(sliced[name], tensor, rtol=0, atol=0)


def test_only_large_row_separable_tensors_are_sliced(sliced):
    karcher_lab.merge(_models(), "karcher")
    assert dict(sliced) == {"b": None, "embed.weight": (1000, 1000 * 20_000 // (4 * 1000 * 64 * 2)),
                            "w": (300, 300 * 20_000 // (4 * 300 * 8 * 4))}
    sliced.clear()
    karcher_lab.merge(_models(), "karcher", params={"block": "row"})  # a Gram per row does not add up
    karcher_lab.merge(_models(), "linear")  # not two-phase
    assert all(rows is None for _, rows in sliced)


def test_a_session_reuses_the_sliced_gram_and_reweights(sliced):
    models = _models()
    session = karcher_lab.MergeSession(models)
    session.merge("karcher", weights=[1, 1, 1, 1])
    misses = session.states.misses
    again = session.merge("karcher", weights=[0, 1, 2, 0])
    assert session.states.misses == misses and session.states.hits >= 3
    expected = karcher_lab.merge(models[1:3], "karcher", weights=[1, 2])
    for name, tensor in expected.items():
        torch.testing.assert_close(again[name].double(), tensor.double(), rtol=1e-6, atol=1e-7)


def test_a_nan_in_a_later_slice_names_the_tensor_and_the_model(monkeypatch):
    models = _models(3)
    models[2]["embed.weight"][990, 5] = float("nan")
    monkeypatch.setattr(execute, "SLICE_INPUT_BYTES", 20_000)
    with pytest.raises(NonFiniteError, match=r"embed\.weight.*model 2 contains 1 NaN"):
        karcher_lab.merge(models, "karcher")


def test_row_slices_of_a_method_that_cannot_use_them_are_refused():
    xs = [torch.randn(6, 3) for _ in range(2)]
    rows = RowSlices(lambda a, b: ([x[a:b] for x in xs], None), rows=6, step=2)
    assert row_separable("karcher", 2, {}) and not row_separable("karcher", 2, {"block": "row"})
    assert not row_separable("linear", 2, {}) and not row_separable("karcher", 2, {"block": "bogus"})
    with pytest.raises(NotSupportedError, match="cannot merge a tensor by row slices"):
        merge_tensors("karcher", rows, block="row")
    torch.testing.assert_close(merge_tensors("karcher", rows), merge_tensors("karcher", xs), rtol=0, atol=0)


def test_load_rows_reads_the_same_rows_as_load(tmp_path):
    from safetensors.torch import save_file

    state = {"a": torch.randn(7, 5).to(torch.bfloat16), "v": torch.randn(4)}
    for folder in ("st", "pt"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
    save_file(state, str(tmp_path / "st" / "model.safetensors"))
    torch.save(state, tmp_path / "pt" / "pytorch_model.bin")
    for source in (Checkpoint(tmp_path / "st", "st"), Checkpoint(tmp_path / "pt", "pt"), StateDictSource(state, "mem")):
        for name, t in state.items():
            assert torch.equal(source.load_rows(name, 1, 3), t[1:3]) and source.load_rows(name, 1, 3).dtype == t.dtype


def test_combine_does_not_read_inputs_with_zero_coefficients():
    xs = [torch.randn(50, 7, dtype=torch.float64) for _ in range(3)]
    poisoned = [xs[0], torch.full((50, 7), float("nan"), dtype=torch.float64), xs[2]]
    for block, coeffs in (("tensor", torch.tensor([0.25, 0.0, 0.75])),
                          ("column", torch.tensor([[0.25, 0.0, 0.75]] * 7))):
        got = combine(poisoned, coeffs, block)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, 0.25 * xs[0] + 0.75 * xs[2], rtol=1e-15, atol=1e-15)
    assert torch.equal(combine(xs, torch.zeros(3)), torch.zeros(50, 7, dtype=torch.float64))
