"""The explorer app in a real browser: `fsdit explore RUN` serves the widget alone (Voilà on localhost) and
headless Chromium (Debian's package, driven by Playwright) picks a held-out class, switches a support off,
clicks Generate, waits for the samples and finds their download link. (The explorer notebook itself, the same
widget with its examples, runs under nbdev_test.)

Needs the `chromium` binary (`make browser` installs it) and the dev extras `playwright` and `voila`;
skipped with the reason otherwise. Playwright's own browser download is never used (`executable_path`).
The screenshot lands in tmp_path, or in $FSDIT_SCREENSHOT_DIR when set.
"""
import importlib.util, os, re, shutil, subprocess, sys, time
from pathlib import Path

import pytest

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


@pytest.fixture
def explore_app_url(tmp_path, demo_tiny):
    "`fsdit explore RUN --no-browser --port N` on the session's tiny demo run, as a user starts it; yields its URL."
    from fsdit.app import free_port
    port, log = free_port(), open(tmp_path / 'explore.log', 'w')
    run = demo_tiny / 'demo' / 'run'
    cli = 'import sys; from fsdit.cli import main; sys.exit(main())'          # what the `fsdit` console script runs
    proc = subprocess.Popen([sys.executable, '-c', cli, 'explore', str(run), '--no-browser', '--port', str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    url = f'http://127.0.0.1:{port}/'
    try:
        for _ in range(600):                                                   # the URL is printed once Voilà answers
            if proc.poll() is not None or url in (tmp_path / 'explore.log').read_text(): break
            time.sleep(0.1)
        assert proc.poll() is None and url in (tmp_path / 'explore.log').read_text(), (tmp_path / 'explore.log').read_text()
        yield url
    finally:
        proc.terminate()                                                       # stops Voilà and removes the app notebook
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


def test_explore_app_in_browser(explore_app_url, tmp_path):
    "The app shows the explorer alone; a held-out class, one support switched off, Generate, the samples and their download."
    from playwright.sync_api import sync_playwright
    shots = Path(os.environ.get('FSDIT_SCREENSHOT_DIR', tmp_path)); shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 1150})
            page.goto(explore_app_url, timeout=120_000)
            try: page.locator('img.fsdit-support').first.wait_for(timeout=120_000)
            except Exception:
                page.screenshot(path=str(shots / 'explore_app_failed.png'), full_page=True); raise
            text = page.inner_text('body')
            assert 'fsdit explorer' in text and 'show_explorer' not in text and 'import' not in text   # no code, no prose
            dropdown = lambda label: page.locator('.widget-dropdown').filter(
                has=page.locator('label', has_text=re.compile(f'^{label}$'))).locator('select')
            classes = dropdown('class')
            options = classes.locator('option').all_inner_texts()
            classes.select_option(options[1])                                   # a held-out (test split) class
            page.locator('.fsdit-status', has_text=f'of {options[1]} (test)').wait_for(timeout=30_000)
            assert dropdown('split').input_value() == 'test'
            page.locator('.fsdit-toggle').nth(1).click()                       # leave one support out
            page.locator('.fsdit-status', has_text='4 of 5 supports on').wait_for(timeout=30_000)
            page.get_by_role('button', name='Generate').click()
            page.locator('.fsdit-status', has_text='generated').wait_for(timeout=120_000)
            samples = page.eval_on_selector_all('img.fsdit-sample', 'els => els.map(e => e.naturalWidth)')
            status = page.inner_text('.fsdit-status')
            link = page.locator('a.fsdit-download')
            href, name = link.get_attribute('href'), link.get_attribute('download')
            off = page.locator('img.fsdit-support.fsdit-off').count()
            page.screenshot(path=str(shots / 'explore_app.png'), full_page=True)
        finally: browser.close()
    assert len(samples) >= 2 and all(w > 0 for w in samples), samples   # CFG 0 beside the chosen scale
    assert 'from 4 supports' in status and off == 1, (status, off)
    assert name == 'fsdit_samples.png' and href.startswith('data:image/png;base64,iVBORw0KGgo'), (name, href[:40])
    assert (shots / 'explore_app.png').stat().st_size > 10_000
