"""A real browser drives JupyterLab through the tour: Run All, then drag the threshold slider.

Debian's chromium (``make test`` installs it with apt when it is missing and we are root) runs
headless through Playwright; JupyterLab runs on 127.0.0.1 with a token on a copy of the
notebooks and is stopped by its PID. A screenshot goes to tests/browser/artifacts/ (git-ignored), and so
do the times from a key press on the slider to the heatmap and the whole dashboard repainted in the
browser (slider-timing.json; recorded, never asserted: timing thresholds do not belong in tests).
"""

from __future__ import annotations

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

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def jupyterlab(tmp_path):
    """(base URL, token) of a JupyterLab serving a copy of notebooks/."""
    pytest.importorskip("playwright")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path / 'notebooks'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 60 s")
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def gpu_squares(page) -> int:
    """GPU-resident markers the placement heatmap draws (its scatter trace's points)."""
    return page.evaluate(
        "() => { const plots = [...document.querySelectorAll('.js-plotly-plot')];"
        " const heat = plots.find(p => p.data && p.data.some(t => t.name === 'on GPU'));"
        " if (!heat) return -1; const s = heat.data.find(t => t.name === 'on GPU');"
        " return s && s.x ? s.x.length : 0; }"
    )


WATCH_DASHBOARD = """() => {
  const el = [...document.querySelectorAll('.widget-html-content')].find(e => e.innerText.includes('re-planned'));
  const heat = [...document.querySelectorAll('.js-plotly-plot')]
    .find(p => p.data && p.data.some(t => t.name === 'on GPU'));
  if (!el || !heat) return false;
  window.__ktlab = {summary: [], heatmap: [], key: 0};
  new MutationObserver(() => window.__ktlab.summary.push(performance.now()))
    .observe(el, {subtree: true, childList: true, characterData: true});
  heat.on('plotly_afterplot', () => window.__ktlab.heatmap.push(performance.now()));
  document.addEventListener('keydown', () => { window.__ktlab.key = performance.now(); }, true);
  return true;
}"""


def key_press_timings(page, handle, presses: int = 8) -> list[dict]:
    """Per key press on the slider, milliseconds until the heatmap was repainted (when the placement
    changed) and until the dashboard's summary was re-rendered (the kernel sends it last, after every
    figure; it changes every time)."""
    assert page.evaluate(WATCH_DASHBOARD), "the dashboard summary or heatmap is not on the page"
    timings = []
    for _ in range(presses):
        handle.focus()
        seen = page.evaluate("() => [window.__ktlab.summary.length, window.__ktlab.heatmap.length]")
        page.keyboard.press("ArrowRight")
        page.wait_for_function(f"() => window.__ktlab.summary.length > {seen[0]}", timeout=30_000)
        time.sleep(0.3)  # let the figures sent before the summary finish drawing
        timings.append(page.evaluate(
            f"() => {{ const k = window.__ktlab; const heat = k.heatmap.slice({seen[1]});"
            f" return {{summary_ms: k.summary[{seen[0]}] - k.key,"
            f" heatmap_ms: heat.length ? heat[0] - k.key : null}}; }}"))
    return timings


def run_all(page, attempts: int = 3) -> None:
    """Run > Run All Cells (runmenu:run-all), once the kernel is connected; the menu is clicked
    again if no cell has started (a click while the kernel is still connecting does nothing)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.wait_for_selector("text=/\\| Idle/", timeout=120_000)  # the status bar: kernel connected
    for _ in range(attempts):
        page.click(".lm-MenuBar-itemLabel:text-is('Run')", timeout=30_000)
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')", timeout=30_000)
        try:
            page.wait_for_function("() => [...document.querySelectorAll('.jp-InputPrompt')]"
                                   ".some(e => /\\[(\\*|\\d+)\\]/.test(e.innerText))", timeout=30_000)
            return
        except PlaywrightTimeout:  # try the menu once more
            continue
    pytest.fail(f"Run All Cells started no cell after {attempts} attempts")


def test_tour_runs_and_the_threshold_slider_repaints_the_heatmap(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/01_tour.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            run_all(page)
            wait_ms = int(os.environ.get("KTLAB_BROWSER_WAIT_MS", 240_000))  # Run All on a busy 2-core box
            handle = page.wait_for_selector(".widget-slider .noUi-handle", timeout=wait_ms)
            page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some("
                                   "p => p.data && p.data.some(t => t.name === 'on GPU'))", timeout=60_000)
            before = gpu_squares(page)
            assert before >= 0
            handle.focus()
            for _ in range(15):  # lower the "hot if share >" threshold: more experts count as hot
                page.keyboard.press("ArrowLeft")
            deadline = time.time() + 30
            after = before
            while after == before and time.time() < deadline:
                time.sleep(0.5)
                after = gpu_squares(page)
            page.screenshot(path=str(ARTIFACTS / "tour-dashboard.png"), full_page=True)
            assert after != before, f"the heatmap did not repaint ({before} GPU squares before and after)"
            timings = key_press_timings(page, handle)
            (ARTIFACTS / "slider-timing.json").write_text(json.dumps(timings, indent=1))
            print("slider key press -> repainted in the browser (ms):", timings)
            errors = page.evaluate("() => [...document.querySelectorAll('.jp-OutputArea-output')]"
                                   ".map(e => e.innerText).filter(t => t.includes('Traceback'))")
            assert not errors, errors[:1]
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "tour-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
