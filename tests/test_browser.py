"""The explorer notebook in a real browser: Voilà serves nbs/12_explorer.ipynb on localhost, headless
Chromium (Debian's package, driven by Playwright) clicks Generate and waits for the generated images.

Needs the `chromium` binary (`make browser` installs it) and the dev extras `playwright` and `voila`;
skipped with the reason otherwise. Playwright's own browser download is never used (`executable_path`).
The screenshot lands in tmp_path, or in $FSDIT_SCREENSHOT_DIR when set.
"""
import importlib.util, os, shutil, socket, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'nbs' / '12_explorer.ipynb'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


def _chromium():
    for name in (os.environ.get('FSDIT_CHROMIUM'), 'chromium', 'chromium-browser'):
        if name and shutil.which(name): return shutil.which(name)
    return None


pytestmark = [
    pytest.mark.skipif(_chromium() is None,
                       reason="no chromium binary on PATH (Debian: `apt-get install chromium`, or `make browser`)"),
    pytest.mark.skipif(importlib.util.find_spec('playwright') is None, reason='playwright is not installed (dev extra)'),
    pytest.mark.skipif(importlib.util.find_spec('voila') is None, reason='voila is not installed (dev extra)'),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture
def explorer_page_url(tmp_path, demo_tiny):
    "Voilà serving the explorer notebook (on the session's tiny demo run) on a free localhost port; yields its URL."
    port, log = _free_port(), open(tmp_path / 'voila.log', 'w')
    env = {**os.environ, 'FSDIT_EXPLORER_DIR': str(demo_tiny)}   # the notebook reuses the trained run
    proc = subprocess.Popen([sys.executable, '-m', 'voila', '--no-browser', f'--port={port}', '--Voila.ip=127.0.0.1', str(NOTEBOOK)],
                            cwd=NOTEBOOK.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f'http://127.0.0.1:{port}/'
    try:
        for _ in range(300):
            if proc.poll() is not None: break
            try: socket.create_connection(('127.0.0.1', port), timeout=2).close(); break   # listening
            except OSError: time.sleep(0.2)
        else: pytest.fail('voila did not start in 60 s')
        assert proc.poll() is None, (tmp_path / 'voila.log').read_text()
        yield url
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


def test_explorer_generates_in_browser(explorer_page_url, tmp_path):
    from playwright.sync_api import sync_playwright
    shots = Path(os.environ.get('FSDIT_SCREENSHOT_DIR', tmp_path)); shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 1100})
            page.goto(explorer_page_url, timeout=120_000)
            # Voilà runs the whole notebook (it trains its tiny run) before the widget shows
            generate = page.get_by_role('button', name='Generate')
            generate.wait_for(timeout=240_000)
            try: page.locator('img.fsdit-support').first.wait_for(timeout=60_000)
            except Exception:
                page.screenshot(path=str(shots / 'explorer_failed.png'), full_page=True); raise
            before = page.locator('img.fsdit-sample').count()
            generate.click()
            page.wait_for_function(f"document.querySelectorAll('img.fsdit-sample').length > {before}",
                                   timeout=120_000)
            page.locator('.fsdit-status', has_text='generated').wait_for(timeout=60_000)
            n = page.locator('img.fsdit-sample').count()
            sizes = page.eval_on_selector_all('img.fsdit-sample', 'els => els.map(e => e.naturalWidth)')
            page.screenshot(path=str(shots / 'explorer.png'), full_page=True)
        finally: browser.close()
    assert n >= 2 and all(w > 0 for w in sizes), (n, sizes)   # CFG 0 beside the chosen scale
    assert (shots / 'explorer.png').stat().st_size > 10_000
