"""The sweep on a Ray cluster (executor="ray"): a local two-CPU cluster started by the test gives the
local executor's results value for value; a run whose driver is killed halfway is completed by a rerun
that computes only the missing cells; a cell that raises (a corrupted expert file) is recorded and the
others finish; `karcher-lab sweep --executor ray`; without Ray, a clear error."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from karcher_lab import Study
from karcher_lab.cli import main
from karcher_lab.errors import InputError, NotSupportedError, ParameterError
from karcher_lab.experiment import load_results, run_sweep
from karcher_lab.experiment.results import ResultStore
from karcher_lab.zoo import get_task

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'karcher-lab[ray]')")

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(per_task=6, probes_per_task=2, draws=4, sites=["residual"], progress=False, report=False, log=None)
GRID = dict(methods=["linear", "ties", "karcher"], m_values=[2, 3, 4], orders=["pool"])
"""9 merge cells and 4 experts: linear, ties and karcher are deterministic."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs on 127.0.0.1 for this module (`ray start --head --block`, stopped after
    it; this process connected as a driver); yields its address. Every port of the head is given: the
    raylet waits a fixed 15 s for the port files of agents started on port 0, which busy cores can
    exceed (ray-project/ray#65983)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_AUTH_MODE", "disabled")  # a throw-away cluster on the loopback interface
        ports = [_free_port() for _ in range(5)]
        command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=2",
                   "--num-gpus=0", "--node-ip-address=127.0.0.1", f"--port={ports[0]}",
                   f"--dashboard-agent-grpc-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
                   f"--metrics-export-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
                   "--include-dashboard=false", "--disable-usage-stats"]
        head = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        address = f"127.0.0.1:{ports[0]}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                    break
                except Exception:
                    ray.shutdown()
                    if head.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            yield address
        finally:
            ray.shutdown()
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()


@pytest.fixture(scope="module")
def local_run(micro_pool, tmp_path_factory):
    return run_sweep(micro_pool, out=tmp_path_factory.mktemp("local") / "run", **GRID, **SMALL)


def _values(results: pd.DataFrame) -> pd.DataFrame:
    """Every row but the merge timings, in a fixed order."""
    rows = results[results["metric"] != "merge_seconds"]
    return rows.sort_values(["order", "method", "m", "experts", "scope", "task", "site", "layer", "metric"]).reset_index(drop=True)


def _cells(run_dir) -> dict[str, int]:
    """The run's finished cell files and their modification times (ns)."""
    cells = run_dir / "cells"
    return {p.name: p.stat().st_mtime_ns for p in cells.glob("*.csv")} if cells.is_dir() else {}


def test_a_ray_sweep_equals_the_local_sweep_value_for_value(cluster, micro_pool, local_run, tmp_path):
    results = run_sweep(micro_pool, out=tmp_path / "run", executor="ray", **GRID, **SMALL)
    assert len(_cells(tmp_path / "run")) == 9 + 4 and len(ResultStore(tmp_path / "run").failures()) == 0
    pd.testing.assert_frame_equal(_values(results), _values(local_run), check_exact=True)
    assert (tmp_path / "run" / "results.csv").is_file()


def test_a_killed_ray_run_is_completed_by_a_rerun_of_only_the_missing_cells(cluster, micro_pool, local_run, tmp_path):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import torch
        from karcher_lab.experiment import run_sweep
        from karcher_lab.zoo import find_pool
        torch.set_num_threads(1)
        run_sweep(find_pool({str(micro_pool.path)!r}), out={str(run_dir)!r}, executor="ray", ray_address={cluster!r},
                  **{GRID!r}, **{SMALL!r})
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not [name for name in _cells(run_dir) if not name.startswith("expert__")]:
            assert driver.poll() is None, "the sweep ended before any merge cell was written"
            assert time.monotonic() < deadline, "no merge cell written in 120 s"
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies with its tasks in flight
        driver.wait()
    time.sleep(1.0)  # Ray kills the dead driver's workers
    before = _cells(run_dir)
    merges_before = [name for name in before if not name.startswith("expert__")]
    assert 1 <= len(merges_before) < 9, f"the kill did not land halfway: {len(merges_before)} of 9 merge cells"
    messages: list[str] = []
    results = run_sweep(micro_pool, out=run_dir, executor="ray", **GRID, **{**SMALL, "log": messages.append})
    after = _cells(run_dir)
    assert f"9 cells ({len(merges_before)} already done)" in messages[0]
    assert {name: after[name] for name in before} == before  # no finished cell was computed again
    assert len(after) == 9 + 4
    pd.testing.assert_frame_equal(_values(results), _values(local_run), check_exact=True)


def _study_with_a_corrupted_expert(micro_pool, root) -> Study:
    """The micro pool's double, units and dates experts, the dates expert's weights overwritten with junk."""
    tasks = {}
    for task in ("double", "units", "dates"):
        lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}) for e in get_task(task).examples("eval", 6, seed=0)]
        (root / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
        tasks[task] = str(root / f"{task}.jsonl")
    broken = root / "dates-expert"
    shutil.copytree(micro_pool.expert_path("dates"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    experts = {"double": str(micro_pool.expert_path("double")), "units": str(micro_pool.expert_path("units")),
               "dates": str(broken)}
    return Study(experts=experts, base=str(micro_pool.base_path), tasks=tasks, name="one-broken")


def test_a_cell_that_raises_is_recorded_and_the_others_finish(cluster, micro_pool, tmp_path):
    study = _study_with_a_corrupted_expert(micro_pool, tmp_path)
    messages: list[str] = []
    results = run_sweep(study, out=tmp_path / "run", executor="ray", methods=["linear", "karcher"], m_values=[2],
                        orders=["double,units", "double,dates"], **{**SMALL, "log": messages.append})
    merged = results.query("method != 'expert'")[["order", "method"]].drop_duplicates()
    assert sorted(map(tuple, merged.values)) == [("double,units", "karcher"), ("double,units", "linear")]
    assert sorted(results.query("method == 'expert'")["experts"].unique()) == ["double", "units"]
    failed = ResultStore(tmp_path / "run").failures().sort_values(["order", "method"]).reset_index(drop=True)
    assert list(zip(failed["order"], failed["method"], failed["experts"])) == [
        ("", "expert", "dates"), ("double,dates", "karcher", "double+dates"), ("double,dates", "linear", "double+dates")]
    assert failed["message"].str.contains("dates-expert|safetensors|header", case=False).all()
    record = json.loads(next((tmp_path / "run" / "failed").glob("double-dates__linear*.json")).read_text())
    assert "Traceback" in record["traceback"] and record["error"] == failed["error"].iloc[2]
    assert any("3 cell(s) failed" in m for m in messages)


def test_cli_sweep_on_ray(cluster, micro_pool, local_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sweep", "--pool", str(micro_pool.path), "--executor", "ray", "--ray-address", cluster,
                 "--methods", "linear", "--m", "2", "--order", "pool", "--per-task", "6", "--probes", "2",
                 "--draws", "4", "--sites", "residual", "--out", str(out), "--quiet", "--no-report"]) == 0
    first_two = [e["task"] for e in micro_pool.experts[:2]]
    local = _values(local_run)
    expected = local[((local["method"] == "linear") & (local["m"] == 2))
                     | ((local["method"] == "expert") & local["experts"].isin(first_two))].reset_index(drop=True)
    pd.testing.assert_frame_equal(_values(load_results(out / "results.csv")), expected, check_exact=True)
    assert main(["sweep", "--pool", str(micro_pool.path), "--executor", "ray", "--num-gpus-per-cell", "1",
                 "--m", "2", "--out", str(tmp_path / "gpu")]) == 2
    assert "use device='cuda'" in capsys.readouterr().err
    assert main(["sweep", "--pool", str(micro_pool.path), "--num-gpus-per-cell", "1", "--out", str(tmp_path / "x")]) == 2
    assert "need --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "x").exists()


def test_models_held_in_memory_and_bad_resources_are_refused(cluster, micro_pool, tmp_path):
    from karcher_lab.study.resolve import load_model

    jsonl = tmp_path / "double.jsonl"
    jsonl.write_text(json.dumps({"prompt": "dbl:ab=", "answer": "aabb"}) + "\n")
    in_memory = Study(experts={"double": load_model(micro_pool.expert_path("double")),
                               "units": str(micro_pool.expert_path("units"))},
                      tasks={"double": str(jsonl), "units": str(jsonl)})
    with pytest.raises(InputError, match=r"experts\[0\]\[1\] is held in memory"):
        run_sweep(in_memory, out=tmp_path / "run", executor="ray", methods=["linear"], m_values=[2], orders=["pool"],
                  **SMALL)
    with pytest.raises(ParameterError, match="unknown key"):
        run_sweep(micro_pool, out=tmp_path / "run", executor="ray", resources={"gpus": 1}, methods=["linear"],
                  m_values=[2], orders=["pool"], **SMALL)
    with pytest.raises(ParameterError, match="executor"):
        run_sweep(micro_pool, out=tmp_path / "run", executor="dask", methods=["linear"], m_values=[2], **SMALL)
    assert not (tmp_path / "run").exists()


def test_without_ray_the_error_says_how_to_install_it(micro_pool, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(NotSupportedError, match=r"pip install 'karcher-lab\[ray\]'"):
        run_sweep(micro_pool, out=tmp_path / "run", executor="ray", methods=["linear"], m_values=[2], orders=["pool"],
                  **SMALL)
    assert not (tmp_path / "run").exists()
