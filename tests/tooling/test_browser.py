"""Every solutions notebook and every untouched chapter in a real JupyterLab, in headless Chromium.

Run with ``make test-browser`` (or ``pytest -m browser tests/tooling/test_browser.py``); ``make test``
leaves it out. It needs Debian's chromium at /usr/bin/chromium (``make test-browser``
installs it with apt-get when missing); Playwright drives that browser, since Playwright's own
browser download is not available here.

One JupyterLab server on 127.0.0.1 serves a scratch copy of solutions/ and chapters/ (so
nothing is saved into the repository), with CIRCUITS_STRICT_CHECKS removed from its
environment: its kernels behave as a learner's (a failed check prints its ✗ message and
returns). For each notebook: open it, Run > Run All Cells, wait until no cell is queued or
running, save it (File > Save Notebook, into the scratch copy) and assert that the page shows
the notebook's cells, that every code cell ran and that no cell shows an error (a stderr box with
a traceback or an exception's line; JupyterLab renders errors as stderr boxes) or saved an error
output. Then

- solutions/: assert that every check cell (tagged ``check``) printed its ✓ line and no ✗
  line, that plotly figures rendered (a drawn SVG inside each ``.js-plotly-plot``), and, where
  the chapter has an explorer, that its ipywidgets slider rendered and that moving it redraws
  the explorer. Screenshots go to screenshots/<notebook>/.
- chapters/ (the stubs untouched; every code cell ran, so Run All did not stop at a check):
  assert that exactly the cells tagged ``check`` in the notebook's JSON print a ✗ message, each
  its "✗ Exercise N.M (function): not implemented yet" line (N the chapter's number) and the
  "The chapter goes on with the course's own ... in place of yours" line. Screenshots of every check cell go to
  screenshots/chapters/<chapter>/ (screenshots/<notebook>/ holds the solutions notebook's).
"""

from __future__ import annotations

import json
import os
import re
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

from utils.tooling import notebooks

pytestmark = pytest.mark.browser

ROOT = notebooks.REPO_ROOT
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "screenshots"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
CHECK_TAG = "check"
STRICT_ENV = "CIRCUITS_STRICT_CHECKS"  # utils.checks.STRICT_ENV, not imported: that pulls in torch
RUN_TIMEOUT_S = int(os.environ.get("BROWSER_RUN_TIMEOUT", "300"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a scratch copy of solutions/ and chapters/; yields (base url, token, served folder).

    CIRCUITS_STRICT_CHECKS is left out of its environment, so its kernels (which jupyter_server
    starts with JPY_SESSION_NAME set) print a failed check instead of raising, as a learner's do."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `make test-browser` (it installs it), "
                    "or `apt-get install -y chromium`")
    served = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "solutions", served / "solutions", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(ROOT / "chapters", served / "chapters", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
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
    env = {name: value for name, value in os.environ.items() if name != STRICT_ENV}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
    """Run > Run All Cells once the kernel is ready, then wait until no code cell is queued or
    running: every cell has run, or one failed and the kernel dropped the cells queued after it.

    (An error output is not told apart in the page: JupyterLab renders it, like a stream to
    stderr, as a ``.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]`` box, so
    the run's end is read from the prompts; errors are looked for afterwards.)"""
    # cells queued while the kernel is still starting can be dropped, so wait for it to be idle
    page.wait_for_function("() => /\\| Idle/.test(document.querySelector('#jp-main-statusbar')?.innerText ?? '')",
                           timeout=120_000, polling=500)
    page.wait_for_timeout(1000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    prompts = "[...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent)"
    # Run All marks every code cell queued ([*]) at once; a cell leaves [*] when it ran or was dropped
    page.wait_for_function(f"""() => {{ const prompts = {prompts};
        return prompts.some(t => t.includes('*')) || (prompts.length > 0 && prompts.every(t => /\\[\\d+\\]/.test(t))); }}""",
                           timeout=60_000, polling=200)
    page.wait_for_function(f"() => !{prompts}.some(t => t.includes('*'))", timeout=RUN_TIMEOUT_S * 1000, polling=1000)


def _save(page, path: Path) -> list[dict]:
    """File > Save Notebook; returns the saved notebook's cells (with outputs and execution counts)."""
    before = path.stat().st_mtime_ns
    page.locator(".lm-MenuBar-itemLabel", has_text="File").first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Save Notebook$")).first.click()
    deadline = time.time() + 60
    while True:
        try:
            if path.stat().st_mtime_ns != before:
                return json.loads(path.read_text(encoding="utf-8"))["cells"]
        except ValueError:  # caught while it was being written
            pass
        assert time.time() < deadline, f"{path.name}: File > Save Notebook did not write the notebook within 60 s"
        time.sleep(0.5)


def _explorer_text(page) -> str:
    return page.locator(".jp-Notebook .widget-vbox").last.inner_text()


def _notebook_cells(path: Path) -> list[dict]:
    """The cells of a notebook file: cell type, source and tags."""
    return [{"type": cell["cell_type"], "source": "".join(cell["source"]),
             "tags": cell.get("metadata", {}).get("tags", [])}
            for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]]


def _page_cells(page) -> list[dict]:
    """Every cell the notebook page shows, in order: code or not, input prompt, the text of its
    stdout and stderr boxes (an error output is rendered as a stderr box) and of its output area."""
    return page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')].map(cell => ({
        code: cell.classList.contains('jp-CodeCell'),
        prompt: (cell.querySelector('.jp-InputPrompt')?.textContent ?? '').trim(),
        stdout: [...cell.querySelectorAll("[data-mime-type='application/vnd.jupyter.stdout']")].map(e => e.innerText),
        stderr: [...cell.querySelectorAll("[data-mime-type='application/vnd.jupyter.stderr']")].map(e => e.innerText),
        output: cell.querySelector('.jp-Cell-outputArea')?.innerText ?? '',
    }))""")


def _first_line(cell: dict) -> str:
    return (cell["source"].strip().splitlines() or [""])[0][:80]


# a stderr box showing an exception: a traceback, a ✗ check message raised (CheckFailed renders
# without a traceback) or an "XxxError: ..." line; warnings are stderr too but match none of these
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|^\s*✗|^\s*[\w.]*(Error|Exception|Failed)\b", re.M)


def _run_and_look(page, notebook: Path, cells: list[dict], shots: Path) -> list[dict]:
    """Run All Cells in the open `notebook` (whose cells, read before it ran, are `cells`), save it,
    and assert that the page shows the notebook's cells, that every code cell ran and that no
    cell shows or saved an error. Returns the cells the page shows (see _page_cells)."""
    _run_all(page)
    page.screenshot(path=str(shots / "top.png"))
    shown = _page_cells(page)
    assert [c["type"] == "code" for c in cells] == [c["code"] for c in shown], (
        f"{notebook.name}: the page shows {len(shown)} cells ({sum(c['code'] for c in shown)} code), "
        f"the notebook has {len(cells)} ({sum(c['type'] == 'code' for c in cells)} code)")
    saved = _save(page, notebook)
    assert len(saved) == len(cells), f"{notebook.name}: saved {len(saved)} cells, the notebook has {len(cells)}"

    errors = [f"cell {i} ({_first_line(cells[i])}): {text[:400]!r}"
              for i, cell in enumerate(shown) for text in cell["stderr"] if ERROR_TEXT.search(text)]
    errors += [f"cell {i} ({_first_line(cells[i])}) saved an error output: "
               f"{output.get('ename')}: {str(output.get('evalue'))[:300]!r}"
               for i, cell in enumerate(saved) for output in cell.get("outputs", [])
               if output.get("output_type") == "error"]
    assert not errors, f"{notebook.name}: a cell shows an error:\n" + "\n".join(errors)

    not_run = [f"cell {i} {shown[i]['prompt'] or '[?]'} {_first_line(cells[i])}"
               for i, cell in enumerate(cells) if cell["type"] == "code"
               and not (re.fullmatch(r"\[\d+\]:", shown[i]["prompt"]) and saved[i].get("execution_count"))]
    assert not not_run, f"{notebook.name}: Run All Cells did not run every code cell; not run: {not_run}"
    return shown


def _checks(notebook: Path, cells: list[dict], shown: list[dict]) -> list[tuple[int, str, dict]]:
    """(cell index, source, shown cell) of each cell tagged "check" in the notebook's JSON."""
    checks = [(i, cell["source"].strip(), shown[i]) for i, cell in enumerate(cells) if CHECK_TAG in cell["tags"]]
    assert checks, f"{notebook.name}: no cell is tagged {CHECK_TAG!r}"
    return checks


def _shut_down_kernel(base: str, token: str, notebook: str) -> None:
    """End the kernel of `notebook` (a path under the served root): closing the page leaves it running."""
    headers = {"Authorization": f"token {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}/api/sessions", headers=headers), timeout=10) as r:
            sessions = json.load(r)
        for session in sessions:
            if session.get("path") == notebook:
                urllib.request.urlopen(urllib.request.Request(f"{base}/api/sessions/{session['id']}", method="DELETE",
                                                              headers=headers), timeout=30).close()
    except OSError as err:  # the next notebook's kernel still starts; say so and go on
        print(f"could not shut down the kernel of {notebook}: {err}")


def _report_failure(page, shots: Path, notebook: Path, cells: list[dict]) -> None:
    """On a failure: a screenshot, and the code cells that have no execution count (the one
    still running, [*], is where a run hangs)."""
    try:
        page.screenshot(path=str(shots / "failure.png"))
        shown = _page_cells(page)
        print(f"{notebook.name}: input prompts when it failed: {[c['prompt'] for c in shown if c['code']]}")
        not_run = [(i, c["prompt"], _first_line(cells[i])) for i, c in enumerate(shown)
                   if c["code"] and i < len(cells) and not re.fullmatch(r"\[\d+\]:", c["prompt"])]
        print(f"{notebook.name}: code cells without an execution count: {not_run}")
    except Exception as err:  # the page itself may be gone
        print(f"{notebook.name}: could not read the page: {err}")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_notebook_runs_in_jupyterlab_with_figures_and_widgets(lab, browser, path: Path) -> None:
    base, token, served = lab
    notebook = served / "solutions" / path.name
    cells = _notebook_cells(notebook)
    shots = SHOTS / path.stem
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{base}/lab/tree/solutions/{path.name}?token={token}&reset")
        page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
        shown = _run_and_look(page, notebook, cells, shots)
        # this server's kernels print a failed check instead of raising it: read every check's output
        for index, source, cell in _checks(notebook, cells, shown):
            assert any("✓ Exercise" in text for text in cell["stdout"]) and "✗" not in cell["output"], (
                f"{path.name}: check cell {index} ({source}) did not pass: {cell['output'][:500]!r}")

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
        _report_failure(page, shots, notebook, cells)
        raise
    finally:
        page.close()
        _shut_down_kernel(base, token, f"solutions/{path.name}")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_untouched_chapter_runs_to_the_end_showing_each_check_message(lab, browser, path: Path) -> None:
    base, token, served = lab
    notebook = served / "chapters" / path.name
    cells = _notebook_cells(notebook)
    chapter = int(path.stem[:2])
    shots = SHOTS / "chapters" / path.stem  # screenshots/<notebook>/ holds the solutions notebook's
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{base}/lab/tree/chapters/{path.name}?token={token}&reset")
        page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
        shown = _run_and_look(page, notebook, cells, shots)
        checks = _checks(notebook, cells, shown)

        failed = [i for i, cell in enumerate(shown) if any(re.search(r"✗ Exercise \d+\.\d+ \(", t) for t in cell["stdout"])]
        assert failed == [index for index, _, _ in checks], (
            f"{path.name}: the cells tagged {CHECK_TAG!r} are {[index for index, _, _ in checks]}, "
            f"the cells showing a ✗ exercise message are {failed}")
        for index, source, cell in checks:
            function = re.fullmatch(r"(\w+) = checks\.check_\1\(\1\)", source)
            assert function, f"{path.name}: check cell {index} does not call one checker: {source!r}"
            printed = "\n".join(cell["stdout"])
            expected = rf"^✗ Exercise {chapter}\.\d+ \({function[1]}\)[^:\n]*: not implemented yet\."
            assert re.search(expected, printed, re.M), (
                f"{path.name}: check cell {index} ({source}) does not print /{expected}/: {cell['output'][:500]!r}")
            assert "in place of yours" in printed, (
                f"{path.name}: check cell {index} ({source}) does not say the chapter goes on: {cell['output'][:500]!r}")
            assert "✓" not in cell["output"], f"{path.name}: check cell {index} ({source}) passed a stub"

        on_page = page.locator(".jp-Notebook .jp-Cell")
        for n, (index, _, _) in enumerate(checks, start=1):
            on_page.nth(index).scroll_into_view_if_needed()
            on_page.nth(index).screenshot(path=str(shots / f"check_{n}.png"))
    except Exception:
        _report_failure(page, shots, notebook, cells)
        raise
    finally:
        page.close()
        _shut_down_kernel(base, token, f"chapters/{path.name}")
