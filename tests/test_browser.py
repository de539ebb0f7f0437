"""Every solutions notebook in a real JupyterLab, driven in headless Chromium.

Run with ``make test-browser`` (or ``pytest -m browser tests/test_browser.py``); ``make test``
leaves it out. It needs Debian's chromium at /usr/bin/chromium (``make test-browser``
installs it with apt-get when missing); Playwright drives that browser, since Playwright's own
browser download is not available here.

For each notebook: start JupyterLab on 127.0.0.1 over a copy of solutions/ (so nothing is
saved into the repository), open the notebook, Run > Run All Cells, wait for the kernel, and
assert that no cell shows an error, that plotly figures rendered (a drawn SVG inside each
``.js-plotly-plot``), and, where the chapter has an explorer, that its ipywidgets slider
rendered and that moving it redraws the explorer. Screenshots go to screenshots/<notebook>/.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from utils import notebooks

pytestmark = pytest.mark.browser

ROOT = notebooks.REPO_ROOT
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "screenshots"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
RUN_TIMEOUT_S = int(os.environ.get("BROWSER_RUN_TIMEOUT", "300"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a scratch copy of solutions/; yields (base url, token, served folder)."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `make test-browser` (it installs it), "
                    "or `apt-get install -y chromium`")
    served = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "solutions", served / "solutions")
    settings = served / ".settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # render every cell (no windowing), so figures far down the notebook are in the page too
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    news = served / ".settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
               f"--LabApp.user_settings_dir={served / '.settings'}",
               f"--LabApp.workspaces_dir={served / '.workspaces'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(served / "lab.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start: {(served / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield base, token, served
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _run_all(page) -> None:
    """Run > Run All Cells once the kernel is ready, then wait until every code cell has run
    (or one failed: Run All stops there) and none is queued or running."""
    # cells queued while the kernel is still starting can be dropped, so wait for it to be idle
    page.wait_for_function("() => /\\| Idle/.test(document.querySelector('#jp-main-statusbar')?.innerText ?? '')",
                           timeout=120_000, polling=500)
    page.wait_for_timeout(1000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-Notebook .jp-InputPrompt')].map(p => p.textContent);
            const cells = document.querySelectorAll('.jp-Notebook .jp-CodeCell').length;
            const done = prompts.filter(t => /\\[\\d+\\]/.test(t)).length;
            const busy = prompts.some(t => t.includes('*'));
            const failed = document.querySelector(".jp-Notebook [data-mime-type='application/vnd.jupyter.error']");
            return cells > 0 && !busy && (done === cells || failed !== null);  // Run All stops at an error
        }""",
        timeout=RUN_TIMEOUT_S * 1000, polling=1000)


def _explorer_text(page) -> str:
    return page.locator(".jp-Notebook .widget-vbox").last.inner_text()


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_notebook_runs_in_jupyterlab_with_figures_and_widgets(lab, browser, path: Path) -> None:
    base, token, _ = lab
    shots = SHOTS / path.stem
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{base}/lab/tree/solutions/{path.name}?token={token}&reset")
        page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
        _run_all(page)
        page.screenshot(path=str(shots / "top.png"))

        errors = page.locator(".jp-Notebook [data-mime-type='application/vnd.jupyter.error']")
        assert errors.count() == 0, f"{path.name}: a cell shows an error: {errors.first.inner_text()[:500]}"

        figures = page.locator(".jp-Notebook .js-plotly-plot")
        page.wait_for_function("() => document.querySelectorAll('.jp-Notebook .js-plotly-plot .main-svg').length > 0",
                               timeout=60_000)
        count = figures.count()
        assert count >= 1, f"{path.name}: no plotly figure rendered"
        drawn = page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .js-plotly-plot')]
                                   .filter(f => f.querySelector('.main-svg') && f.getBoundingClientRect().width > 100).length""")
        assert drawn == count, f"{path.name}: {count - drawn} of {count} plotly figures did not draw"
        for i in range(min(count, 4)):
            figures.nth(i).scroll_into_view_if_needed()
            figures.nth(i).screenshot(path=str(shots / f"figure_{i}.png"))

        sliders = page.locator(".jp-Notebook .widget-slider")
        if sliders.count():
            explorer = page.locator(".jp-Notebook .widget-vbox").last
            explorer.scroll_into_view_if_needed()
            page.wait_for_function("() => [...document.querySelectorAll('.jp-Notebook .widget-vbox')].pop()"
                                   ".querySelector('.js-plotly-plot .main-svg') !== null", timeout=60_000)
            explorer.screenshot(path=str(shots / "widget_before.png"))
            before = _explorer_text(page)
            handle = sliders.first.locator(".noUi-handle")
            handle.focus()
            handle.press("ArrowLeft")
            page.wait_for_function(
                """(before) => { const boxes = [...document.querySelectorAll('.jp-Notebook .widget-vbox')];
                                 return boxes.pop().innerText !== before; }""",
                arg=before, timeout=60_000)
            page.wait_for_timeout(1500)  # let plotly finish drawing the new figures
            explorer.screenshot(path=str(shots / "widget_after.png"))
            assert _explorer_text(page) != before
    except Exception:
        page.screenshot(path=str(shots / "failure.png"))
        prompts = page.evaluate("() => [...document.querySelectorAll('.jp-Notebook .jp-InputPrompt')].map(p => p.textContent)")
        print(f"{path.name}: input prompts when it failed: {prompts}")
        raise
    finally:
        page.close()
