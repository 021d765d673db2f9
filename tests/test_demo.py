"""`karcher-lab demo`: the reduced sweep on the tiny zoo (here pointed at the micro pool and a smaller grid)."""
from __future__ import annotations

import re

import pytest
import torch

from karcher_lab import demo
from karcher_lab.cli import main
from karcher_lab.experiment import load_results
from karcher_lab.zoo import PoolNotBuiltError


@pytest.fixture
def micro_demo(micro_pool, monkeypatch):
    """The demo on the micro pool with a two-method, m ∈ {2, 3} grid (the real grid takes minutes)."""
    monkeypatch.setattr(demo, "demo_pool", lambda **kwargs: micro_pool)
    monkeypatch.setattr(demo, "DEMO_METHODS", ("linear", "karcher"))
    monkeypatch.setattr(demo, "DEMO_M", (2, 3))
    monkeypatch.setattr(demo, "DEMO_MEASURE", dict(per_task=6, probes_per_task=2, draws=4))
    threads = torch.get_num_threads()
    yield micro_pool
    torch.set_num_threads(threads)


def test_demo_runs_the_sweep_and_says_where_the_report_is(micro_demo, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"open {re.escape(str(out))}/report.html", printed)
    assert "mean normalized accuracy" in printed
    results = load_results(out)
    merges = results[results["method"] != "expert"]
    assert set(merges["order"]) == {"near", "far"} and set(merges["m"]) == {2, 3}
    assert set(merges["method"]) == {"linear", "karcher"}
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly.js inlined


def test_demo_grid_is_valid_for_the_tiny_pool():
    """The shipped grid passes the sweep's checks for a 13-expert pool (methods exist, m fits)."""
    from karcher_lab.experiment.grid import applies
    from karcher_lab.methods.registry import get_method

    for method in demo.DEMO_METHODS:
        get_method(method)
        assert any(applies(method, m) for m in demo.DEMO_M)
    assert max(demo.DEMO_M) <= 13 and set(demo.DEMO_ORDERS) == {"near", "far"}


def test_demo_builds_the_pool_when_it_is_missing(monkeypatch, micro_pool):
    built = []

    def missing(size):
        raise PoolNotBuiltError(size)

    monkeypatch.setattr(demo, "find_pool", missing)
    monkeypatch.setattr(demo, "build_pool", lambda config, progress: built.append(config.size) or micro_pool)
    assert demo.demo_pool(log=None) is micro_pool and built == ["tiny"]
