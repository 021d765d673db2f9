"""The real-browser test: JupyterLab on 127.0.0.1 with a token, driven by Debian's chromium through playwright.

Opens notebooks/01_merge_explorer.ipynb (a temporary copy, pointed at the micro pool through
$KARCHER_LAB_NOTEBOOK_POOL), runs all cells, waits for MergeExplorer's weight sliders and the plotly
figures, moves a weight slider and then the η slider with the keyboard, and checks after each move that
the figures' data changed in the browser and that the panel shows no error. A second test does the same
for notebook 02's GeometryPlayground (η and weight sliders). A third runs notebook 06 on a study of the micro
pool's experts as model folders and JSONL files ($KARCHER_LAB_NOTEBOOK_STUDY), moves a weight slider, types a
folder in the test's tmp_path into the panel, presses "save this merge", waits for the panel to say "saved to"
that folder, and loads it with transformers. All share one server. Screenshots are written to
$KARCHER_LAB_ARTIFACTS (or the test's tmp_path) and their paths printed.

Skipped only when /usr/bin/chromium is missing (.ci/run installs it); `playwright install` is never used.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from karcher_lab.study import export_pool_study
from karcher_lab.widgets.explorer import KEEP_OUTPUT_CLASS, SAVE_CLASS
from karcher_lab.zoo import cache_root

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "01_merge_explorer.ipynb"
PLAYGROUND_NOTEBOOK = "02_fisher_rao_geometry.ipynb"
STUDY_NOTEBOOK = "06_your_models.ipynb"
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SERVER_START_S = 120
FIRST_RENDER_S = 420   # kernel start, imports, MergeExplorer's first update on a loaded 2-core machine
UPDATE_S = 240          # one debounced update after a slider move

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) is not installed; "
                                "install it with `apt-get install chromium` (.ci/run does)")

PLOT_DATA_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
    gd => JSON.stringify((gd.data || []).map(t => [t.name, Array.from(t.x || []), Array.from(t.y || [])])))"""
KERNEL_IDLE_JS = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.status === 'idle';
}"""
ACTIVE_NOTEBOOK_JS = """path => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    return !!w && !!w.context && w.context.path === path;
}"""
BUSY_JS = """() => Array.from(document.querySelectorAll('.kl-busy')).some(e => e.textContent.trim() !== '')"""
ERROR_JS = """() => Array.from(document.querySelectorAll('.kl-error')).map(e => e.textContent.trim()).filter(t => t).join(' | ')"""
KEEP_OUTPUT_JS = f"""() => Array.from(document.querySelectorAll('.{KEEP_OUTPUT_CLASS}')).map(e => e.textContent.trim()).join(' | ')"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"jupyter lab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"jupyter lab did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory, micro_pool):
    """(base URL, token) of a JupyterLab serving a copy of notebooks/ with the micro pool configured, and
    a study of its experts as model folders and JSONL files for notebook 06."""
    tmp_path = tmp_path_factory.mktemp("jupyter_lab")
    port, token = _free_port(), secrets.token_hex(16)
    root = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, root)
    study = export_pool_study(micro_pool, tmp_path / "study", per_task=4)
    env = dict(os.environ, KARCHER_LAB_CACHE=str(cache_root()), KARCHER_LAB_NOTEBOOK_POOL=str(micro_pool.path),
               KARCHER_LAB_NOTEBOOK_SMOLLM2_POOL=str(micro_pool.path), KARCHER_LAB_NOTEBOOK_QUALITY_EXAMPLES="4",
               KARCHER_LAB_NOTEBOOK_STUDY=str(study))
    for name in ("HOME", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR"):
        env[name] = str(tmp_path / name.lower())
        Path(env[name]).mkdir()
    # no "receive Jupyter news?" toast over the screenshots
    labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"
    labconfig.mkdir()
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    log = tmp_path / "jupyter_lab.log"
    command = [sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={root}",
               "--ServerApp.open_browser=False", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=root)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", process, log)
        yield base, token
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture()
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("KARCHER_LAB_ARTIFACTS") or tmp_path / "artifacts") / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _settle(page, before: list[str] | None, timeout_s: float) -> list[str]:
    """Wait until no update runs and (when ``before`` is given) the figures' data differ from ``before``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = page.evaluate(PLOT_DATA_JS)
        if not page.evaluate(BUSY_JS) and (before is None or data != before):
            page.wait_for_timeout(1500)  # let the rest of the update's figures arrive
            if not page.evaluate(BUSY_JS):
                return page.evaluate(PLOT_DATA_JS)
        page.wait_for_timeout(500)
    raise AssertionError(f"the figures did not change within {timeout_s} s; panel error: {page.evaluate(ERROR_JS)!r}")


def _nudge(page, css: str, presses: int) -> str:
    """Focus the first slider handle inside ``css`` and press an arrow key ``presses`` times: ArrowRight,
    or ArrowLeft when the slider sits at its maximum. Returns the key pressed."""
    handle = page.locator(f"{css} .noUi-handle").first
    handle.scroll_into_view_if_needed()
    at_max = float(handle.get_attribute("aria-valuenow")) >= float(handle.get_attribute("aria-valuemax"))
    key = "ArrowLeft" if at_max else "ArrowRight"
    handle.focus()
    for _ in range(presses):
        handle.press(key)
    return key


def _shoot(page, folder: Path, name: str, panel: str = ".kl-weight-slider") -> Path:
    """A screenshot of the page with the output holding ``panel`` scrolled to the top of the notebook."""
    page.evaluate("""css => document.querySelector('.jp-OutputArea-output ' + css)
        .closest('.jp-OutputArea-output').scrollIntoView({block: 'start'})""", panel)
    page.wait_for_timeout(500)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def _open_and_run_all(browser, base: str, token: str, notebook: str):
    """Open ``notebook`` in a workspace of its own, reset (so JupyterLab does not restore the tab an
    earlier test left active), wait until it is the current widget with an idle kernel, run all cells."""
    page = browser.new_page(viewport={"width": 1400, "height": 3000})
    workspace = Path(notebook).stem
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={token}", timeout=120_000)
    page.wait_for_function(ACTIVE_NOTEBOOK_JS, arg=notebook, timeout=180_000, polling=500)
    page.wait_for_function(KERNEL_IDLE_JS, timeout=180_000, polling=500)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    return page


@contextlib.contextmanager
def _notebook_page(jupyter_lab, notebook: str, ready: str):
    """Chromium on ``notebook`` after run-all, once the ``ready`` element is shown and the kernel is idle."""
    from playwright.sync_api import sync_playwright

    base, token = jupyter_lab
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = _open_and_run_all(browser, base, token, notebook)
            page.wait_for_selector(ready, timeout=FIRST_RENDER_S * 1000)
            page.wait_for_function(KERNEL_IDLE_JS, timeout=FIRST_RENDER_S * 1000, polling=1000)
            yield page
        finally:
            browser.close()


def test_merge_explorer_in_jupyterlab(jupyter_lab, artifacts):
    with _notebook_page(jupyter_lab, NOTEBOOK, ".kl-weight-slider") as page:
        page.wait_for_selector(".js-plotly-plot", timeout=FIRST_RENDER_S * 1000)
        initial = _settle(page, None, UPDATE_S)
        assert any(any(len(x) for _, x, _ in json.loads(d)) for d in initial), "the figures hold no data"
        _shoot(page, artifacts, "1_initial")
        assert page.evaluate(ERROR_JS) == "", f"the panel shows an error: {page.evaluate(ERROR_JS)}"

        print("weight slider:", _nudge(page, ".kl-weight-slider", 5))
        after_weight = _settle(page, initial, UPDATE_S)
        _shoot(page, artifacts, "2_after_weight")
        assert after_weight != initial
        assert page.evaluate(ERROR_JS) == "", f"the panel shows an error: {page.evaluate(ERROR_JS)}"

        print("eta slider:", _nudge(page, ".kl-eta-slider", 3))
        after_eta = _settle(page, after_weight, UPDATE_S)
        _shoot(page, artifacts, "3_after_eta")
        assert after_eta != after_weight
        assert page.evaluate(ERROR_JS) == "", f"the panel shows an error: {page.evaluate(ERROR_JS)}"
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
        assert not [e for e in errors if "Traceback" in e], f"a cell printed a traceback: {errors}"


def test_geometry_playground_in_jupyterlab(jupyter_lab, artifacts):
    """Notebook 02's GeometryPlayground: moving its η and weight sliders redraws the simplex and the trace."""
    with _notebook_page(jupyter_lab, PLAYGROUND_NOTEBOOK, ".kl-playground-eta") as page:
        initial = _settle(page, None, UPDATE_S)
        _shoot(page, artifacts, "4_playground_initial", ".kl-playground-eta")
        print("playground eta slider:", _nudge(page, ".kl-playground-eta", 6))
        after_eta = _settle(page, initial, UPDATE_S)
        print("playground weight slider:", _nudge(page, ".kl-playground-weight", 8))
        after_weight = _settle(page, after_eta, UPDATE_S)
        _shoot(page, artifacts, "5_playground_moved", ".kl-playground-eta")
        assert initial != after_eta != after_weight
        assert page.evaluate(ERROR_JS) == "", f"a panel shows an error: {page.evaluate(ERROR_JS)}"


def test_save_this_merge_of_a_study_in_jupyterlab(jupyter_lab, artifacts, tmp_path, micro_pool):
    """Notebook 06: after a weight slider move, "save this merge" into a folder typed in the panel writes a
    checkpoint that transformers loads."""
    from transformers import AutoModelForCausalLM

    saved = tmp_path / "saved_merge"
    with _notebook_page(jupyter_lab, STUDY_NOTEBOOK, f".{SAVE_CLASS}") as page:
        page.wait_for_selector(".js-plotly-plot", timeout=FIRST_RENDER_S * 1000)
        initial = _settle(page, None, UPDATE_S)
        _shoot(page, artifacts, "6_study_initial")
        print("weight slider:", _nudge(page, ".kl-weight-slider", 5))
        after_weight = _settle(page, initial, UPDATE_S)
        assert after_weight != initial
        assert page.evaluate(ERROR_JS) == "", f"the panel shows an error: {page.evaluate(ERROR_JS)}"

        page.locator(f".widget-hbox:has(.{SAVE_CLASS}) input[type='text']").first.fill(str(saved))
        page.locator(f".{SAVE_CLASS}").first.click()
        deadline = time.monotonic() + UPDATE_S
        while f"saved to {saved}" not in page.evaluate(KEEP_OUTPUT_JS) and time.monotonic() < deadline:
            page.wait_for_timeout(500)
        _shoot(page, artifacts, "7_study_saved")
        assert f"saved to {saved}" in page.evaluate(KEEP_OUTPUT_JS), f"the panel says {page.evaluate(KEEP_OUTPUT_JS)!r}"
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
        assert not [e for e in errors if "Traceback" in e], f"a cell printed a traceback: {errors}"
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.num_parameters() == micro_pool.record["base"]["parameters"]
    assert (saved / "merge_recipe.yml").is_file()
