"""Every notebooks/*.ipynb: stored clean, and executed top to bottom on a fresh kernel against the micro pool.

Policy: notebooks are stored WITHOUT outputs (no outputs, no execution counts, kernelspec python3), so the
repository holds sources only and diffs stay readable; CI executes them. Each notebook's first code cell is
tagged ``parameters`` and reads its pool from $KARCHER_LAB_NOTEBOOK_POOL (the tests point it, and
$KARCHER_LAB_NOTEBOOK_SMOLLM2_POOL, at the micro pool's directory) and its sizes from
$KARCHER_LAB_NOTEBOOK_* variables (set small here). Notebook 06 reads a study YAML from
$KARCHER_LAB_NOTEBOOK_STUDY: the micro pool's experts written as model folders and JSONL task files
(:func:`karcher_lab.study.export_pool_study`); without it, it writes such a study itself.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import needs_smollm2

from karcher_lab.study import export_pool_study
from karcher_lab.zoo import cache_root

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SMALL_SIZES = {"KARCHER_LAB_NOTEBOOK_M_MAX": "2", "KARCHER_LAB_NOTEBOOK_PER_TASK": "4", "KARCHER_LAB_NOTEBOOK_DRAWS": "4",
               "KARCHER_LAB_NOTEBOOK_PROBES": "2", "KARCHER_LAB_NOTEBOOK_QUALITY_EXAMPLES": "4"}
"""Sweep sizes for the tests. With one runs folder for the module, 04 (pointed at the micro pool too)
resumes the cells 03 already measured, as a rerun of a sweep does."""
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f"expected notebooks in {NOTEBOOK_DIR}, found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    assert book.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    dirty = [i for i, c in enumerate(book.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; store notebooks cleared"
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell must be tagged 'parameters'"
    assert "KARCHER_LAB_NOTEBOOK_POOL" in code[0].source


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook_runs")


@pytest.fixture(scope="module")
def study_file(micro_pool, tmp_path_factory) -> Path:
    """A study YAML over the micro pool's experts as model folders and their tasks as JSONL files."""
    return export_pool_study(micro_pool, tmp_path_factory.mktemp("notebook_study") / "micro_study", per_task=4)


@pytest.fixture()
def notebook_env(tmp_path, monkeypatch, micro_pool, runs_dir, study_file):
    """A fresh HOME / Jupyter / IPython state and the notebook variables; the kernel inherits this environment."""
    monkeypatch.setenv("KARCHER_LAB_CACHE", str(cache_root()))  # keep the real pool cache though HOME moves
    for name in ("HOME", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR"):
        folder = tmp_path / name.lower()
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("KARCHER_LAB_NOTEBOOK_POOL", str(micro_pool.path))
    monkeypatch.setenv("KARCHER_LAB_NOTEBOOK_SMOLLM2_POOL", str(micro_pool.path))
    monkeypatch.setenv("KARCHER_LAB_NOTEBOOK_RUNS", str(runs_dir))
    monkeypatch.setenv("KARCHER_LAB_NOTEBOOK_STUDY", str(study_file))
    for name, value in SMALL_SIZES.items():
        monkeypatch.setenv(name, value)
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, work)
    return work


def _execute(path: Path) -> nbformat.NotebookNode:
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(book, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
    return book


def _texts(book) -> list[str]:
    out = []
    for cell in book.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                out.append(output.text)
            elif "data" in output:
                out.append(json.dumps(output.data.get("text/plain", "")))
    return out


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS])
def test_notebook_executes_without_errors(name, notebook_env):
    book = _execute(notebook_env / name)
    errors = [o for c in book.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: error outputs {[(o.ename, o.evalue) for o in errors]}"
    tracebacks = [t for t in _texts(book) if "Traceback (most recent call last)" in t]
    assert not tracebacks, f"{name}: a traceback was printed:\n{tracebacks[0][:2000]}"
    assert "SKIPPED" not in "".join(_texts(book)), f"{name} skipped although the pool is built"
    if name.startswith("01_"):
        assert "no error: the last update succeeded" in "".join(_texts(book)), "MergeExplorer shows an error"
    if name.startswith("06_"):
        assert f"saved to {notebook_env / 'merged'}" in "".join(_texts(book))


def test_notebook_06_writes_an_example_study_without_one(notebook_env, monkeypatch, micro_pool):
    """A new user's run: no study given, so notebook 06 writes one from the pool and explores it."""
    monkeypatch.delenv("KARCHER_LAB_NOTEBOOK_STUDY")
    book = _execute(notebook_env / "06_your_models.ipynb")
    text = "".join(_texts(book))
    assert f"name: {micro_pool.name}-study" in text and "my_study/study.yml" in text
    assert f"saved to {notebook_env / 'merged'}" in text


@needs_smollm2
def test_notebook_06_runs_on_smollm2_in_chat_format(notebook_env, monkeypatch, smollm2_study_file):
    """Notebook 06 on a study of real SmolLM2-135M-Instruct and two derived experts whose tasks use its
    chat template: the explorer's exact match decodes under the template, and the saved merge answers."""
    monkeypatch.setenv("KARCHER_LAB_NOTEBOOK_STUDY", str(smollm2_study_file))
    monkeypatch.setenv("KARCHER_LAB_NOTEBOOK_QUALITY_EXAMPLES", "2")
    book = _execute(notebook_env / "06_your_models.ipynb")
    errors = [o for c in book.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, [(o.ename, o.evalue) for o in errors]
    text = "".join(_texts(book))
    assert "study smollm2-capitals: experts ['geo', 'geo2']" in text
    assert f"saved to {notebook_env / 'merged'}" in text and "chat_template: true" in text
    assert "The capital of France is Paris." in text  # the saved merge's greedy answer under the template


def test_smollm2_notebook_skips_with_a_clear_message_when_the_pool_is_missing(notebook_env, monkeypatch, tmp_path):
    monkeypatch.setenv("KARCHER_LAB_NOTEBOOK_SMOLLM2_POOL", str(tmp_path / "no_such_pool"))
    book = _execute(notebook_env / "04_real_model_smollm2.ipynb")
    text = "".join(_texts(book))
    assert "SKIPPED: the SmolLM2 pool is not built" in text and "no_such_pool" in text
