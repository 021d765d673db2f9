"""The sweep (karcher_lab.experiment) on the 4-expert micro pool: schema, known outcomes, resumability,
the report, the pairwise table and the CLI's errors."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from karcher_lab.cli import main
from karcher_lab.errors import InputError, ModelCountError, ParameterError, UnknownMethodError
from karcher_lab.experiment import RESULT_COLUMNS, load_results, make_grid, run_sweep
from karcher_lab.experiment import sweep as sweep_module
from karcher_lab.experiment.grid import applies, parse_m
from karcher_lab.experiment.pairwise import run_pairwise
from karcher_lab.experiment.report import write_report
from karcher_lab.experiment.results import ResultStore

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(per_task=6, probes_per_task=2, draws=4, sites=["residual"], progress=False, log=None)


def cells_on_disk(run_dir) -> int:
    return len(ResultStore(run_dir).done())


@pytest.fixture(scope="module")
def one_expert_run(micro_pool, tmp_path_factory):
    """linear, karcher and ties of m = 1 and 2 experts in pool order."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    return out, run_sweep(micro_pool, methods=["linear", "ties", "karcher"], m_values=[1, 2], orders=["pool"], out=out,
                          report=False, **SMALL)


def test_results_schema(one_expert_run, micro_pool):
    out, results = one_expert_run
    assert list(results.columns) == RESULT_COLUMNS
    assert set(results["scope"]) == {"task", "layer", "weights", "summary"}
    tasks = [e["task"] for e in micro_pool.experts]
    merges = results[results["method"] != "expert"]
    assert set(zip(merges["method"], merges["m"], merges["experts"])) == {
        (method, m, "+".join(tasks[:m])) for method in ("linear", "ties", "karcher") for m in (1, 2)}
    task_rows = merges[merges["scope"] == "task"]
    assert (task_rows["site"] == "").all() and (task_rows["layer"] == -1).all()
    assert set(task_rows["metric"]) == {"accuracy", "normalized_accuracy", "nll", "kl", "fisher_rao"}
    layer_rows = merges[merges["scope"] == "layer"]
    assert (layer_rows["task"] == "").all() and set(layer_rows["layer"]) == {0, 1}
    assert set(layer_rows["metric"]) == {"variance", "effective_rank", "numerical_rank", "variance_ratio",
                                         "effective_rank_ratio", "numerical_rank_ratio"}
    two = task_rows[(task_rows["m"] == 2) & (task_rows["method"] == "linear") & (task_rows["metric"] == "kl")]
    assert list(two["task"]) == tasks[:2]  # every merged expert's task, and only those
    experts = results[results["method"] == "expert"]
    assert set(experts["experts"]) == set(tasks[:2]) and (experts["m"] == 1).all()
    pd.testing.assert_frame_equal(load_results(out), load_results(out / "results.csv"))


def test_merge_of_one_expert_is_that_expert(one_expert_run):
    """m = 1: linear and karcher return the expert itself, so accuracy is normalized to exactly 1, the
    function distance is 0 and every collapse ratio is 1 (paired bootstrap draws)."""
    _, results = one_expert_run
    for method in ("linear", "karcher"):
        cell = results[(results["method"] == method) & (results["m"] == 1)].set_index(["scope", "metric"])
        summary = cell.loc["summary"]
        assert summary.loc["avg_normalized_accuracy", "mean"] == 1.0
        assert abs(summary.loc["avg_kl", "mean"]) < 1e-5
        ratios = cell.loc["layer"].loc[["variance_ratio", "effective_rank_ratio", "numerical_rank_ratio"], "mean"]
        assert ratios.sub(1).abs().max() < 1e-4
        assert abs(cell.loc[("weights", "norm_ratio"), "mean"] - 1) < 1e-6
    expert = results[(results["method"] == "expert") & (results["scope"] == "task") & (results["metric"] == "accuracy")]
    merged = results[(results["method"] == "linear") & (results["m"] == 1) & (results["metric"] == "accuracy")]
    assert merged["mean"].iloc[0] == expert.set_index("experts").loc[merged["experts"].iloc[0], "mean"]


def test_two_expert_merge_moves_away_from_the_experts(one_expert_run):
    _, results = one_expert_run
    kl = results[(results["metric"] == "avg_kl") & (results["m"] == 2)]
    assert (kl["mean"] > 1e-3).all()


def test_rerun_skips_done_cells_and_resumes_after_interruption(micro_pool, tmp_path, monkeypatch):
    calls = []
    real = sweep_module.measure_merge

    def counting(*args, **kwargs):
        calls.append(args[2]["method"])
        if len(calls) == 3 and fail:
            raise KeyboardInterrupt  # the run is interrupted while the third cell is in flight
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "measure_merge", counting)
    grid = dict(methods=["linear", "karcher"], orders=["pool"], out=tmp_path / "run", report=False, **SMALL)
    fail = True
    with pytest.raises(KeyboardInterrupt):
        run_sweep(micro_pool, m_values=[2, 3], **grid)
    assert cells_on_disk(tmp_path / "run") == 3 + 2  # three experts' rows and the two finished merges
    assert len(load_results(tmp_path / "run").query("method != 'expert'")[["method", "m"]].drop_duplicates()) == 2
    fail, calls[:] = False, []
    run_sweep(micro_pool, m_values=[2, 3], **grid)
    assert calls == ["linear", "karcher"]  # only the m = 3 cells: the interrupted one and the one never started
    calls[:] = []
    results = run_sweep(micro_pool, m_values=[2, 3, 4], **grid)
    assert calls == ["linear", "karcher"] and sorted(set(results["m"])) == [1, 2, 3, 4]
    calls[:] = []
    run_sweep(micro_pool, m_values=[2, 3, 4], **grid)
    assert calls == []
    with pytest.raises(InputError, match="per_task"):
        run_sweep(micro_pool, m_values=[2], **{**grid, "per_task": 7})


def test_report_is_self_contained(one_expert_run, micro_pool, tmp_path):
    _, results = one_expert_run
    path = write_report(results, micro_pool, tmp_path / "report.html")
    page = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page)  # plotly's JavaScript is inlined, nothing is fetched
    assert "Plotly.newPlot" in page and page.count("plotly-graph-div") >= 4
    for heading in ("Figure 1 analog", "Figure 2 analog", "Table 7 analog", "Heterogeneity", "task-vector angles"):
        assert heading in page
    assert "karcher" in page and "ties" in page


def test_grid_orders_and_applicability(micro_pool):
    grid = make_grid(micro_pool, methods=["slerp", "arcee_fusion", "model_stock", "karcher"], m_values=["1..2"],
                     orders=["near", "far", "units,dates"])
    levels = {e["task"]: e["level"] for e in micro_pool.experts}
    assert [levels[t] for t in grid.orders["near"]] == sorted(levels.values())
    assert grid.orders["far"] == tuple(reversed(grid.orders["near"]))
    assert grid.orders["units,dates"] == ("units", "dates")
    with pytest.raises(ModelCountError, match=r"1\.\.2"):  # the explicit order has two experts
        make_grid(micro_pool, methods=["linear"], m_values=["2..3"], orders=["units,dates"])
    cells = make_grid(micro_pool, methods=["slerp", "arcee_fusion", "model_stock", "karcher"], m_values=["1..3"],
                      orders=["pool"]).cells()
    assert sorted((c.method, c.m) for c in cells) == sorted(
        [("slerp", 2), ("arcee_fusion", 2), ("model_stock", 2), ("model_stock", 3)] + [("karcher", m) for m in (1, 2, 3)])
    assert applies("linear", 1) and not applies("slerp", 3)
    assert parse_m(["2..4", "7,9"]) == (2, 3, 4, 7, 9)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(methods=["nope"]), UnknownMethodError, "nope"),
    (dict(m_values=["2..9"]), ModelCountError, r"1\.\.4"),
    (dict(m_values=["3..2"]), ParameterError, "ranges"),
    (dict(orders=["near,nope"]), ParameterError, "unknown expert"),
    (dict(orders=["double,double"]), ParameterError, "twice"),
    (dict(methods=["slerp"], m_values=[3]), ModelCountError, "slerp"),
    (dict(params={"ties": {"density": 2}}), ParameterError, "density"),
    (dict(draws=1), ParameterError, "draws"),
    (dict(sites=["nowhere"]), ParameterError, "sites"),
])
def test_bad_input_fails_before_any_work(micro_pool, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        run_sweep(micro_pool, out=tmp_path / "run", **{**dict(methods=["linear"], m_values=[2], progress=False, log=None), **kwargs})
    assert not (tmp_path / "run").exists()


def test_cli_errors(micro_pool, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sweep", "--pool", str(micro_pool.path), "--methods", "nope", "--out", str(out)]) == 2
    assert "unknown merge method 'nope'" in capsys.readouterr().err
    assert main(["sweep", "--pool", str(micro_pool.path), "--m", "2..11", "--out", str(out)]) == 2
    assert "m must lie in 1..4" in capsys.readouterr().err
    assert main(["sweep", "--pool", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no pool called" in capsys.readouterr().err
    assert main(["sweep", "--pool", str(micro_pool.path), "--param", "ties:density", "--out", str(out)]) == 2
    assert "METHOD.NAME=VALUE" in capsys.readouterr().err
    assert main(["pairwise", "--sizes", str(micro_pool.path), "--methods", "slerp", "--order", "nope", "--out", str(out)]) == 2
    assert not out.exists()


def test_cli_sweep_and_pairwise(micro_pool, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--pool", str(micro_pool.path), "--methods", "linear", "karcher", "--m", "2", "3",
                 "--order", "far", "--per-task", "6", "--probes", "2", "--draws", "4", "--sites", "residual",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean normalized accuracy" in printed and f"report: {out / 'report.html'}" in printed
    results = load_results(out / "results.csv")
    assert set(results.query("method != 'expert'")["order"]) == {"far"}
    table = run_pairwise([str(micro_pool.path)], methods=["linear", "slerp", "karcher"], out=tmp_path / "pairs",
                         **{k: v for k, v in SMALL.items()})
    assert list(table.index) == ["linear", "slerp", "karcher"]
    assert table.shape[1] == 2 and (tmp_path / "pairs" / "pairwise.html").is_file()
    # slerp at t = 0.5 and karcher agree for two experts (karcher generalizes SLERP, paper §3)
    assert table.loc["slerp"].iloc[1] == pytest.approx(table.loc["karcher"].iloc[1], rel=0.05)


def test_karcher_cells_do_not_depend_on_the_largest_m(micro_pool, tmp_path):
    """karcher shares one Gram-caching session per order, the experts beyond m at weight 0: its m = 2
    merge must equal the one from a run whose session holds only those two experts."""
    grid = dict(methods=["karcher"], orders=["pool"], report=False, **SMALL)
    alone = run_sweep(micro_pool, m_values=[2], out=tmp_path / "alone", **grid)
    shared = run_sweep(micro_pool, m_values=[2, 4], out=tmp_path / "shared", **grid)
    keys = ["scope", "task", "site", "layer", "metric"]
    a = alone.query("method == 'karcher' and metric != 'merge_seconds'").set_index(keys)["mean"].sort_index()
    b = shared.query("method == 'karcher' and m == 2 and metric != 'merge_seconds'").set_index(keys)["mean"].sort_index()
    pd.testing.assert_series_equal(a, b, rtol=1e-4, atol=1e-6)
