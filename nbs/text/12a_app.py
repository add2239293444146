# %% [markdown]
# # The explorer app
#
# > `fsdit explore RUN`: the explorer of one run as a web app — the widget alone, no notebook around it — served by Voilà on localhost and opened in the browser.
#
# The app is a notebook of one cell, written to a temporary folder, that shows `Explorer` on the run and
# nothing else; Voilà runs it in a kernel and serves the widget (it strips code cells, and the cell's
# output is the widget). Everything is checked before the server starts: the run, its feature store, the
# split, the port and Voilà itself, each refused in one line that says what to do.

# %%
#| default_exp app

# %%
#| export
from __future__ import annotations
import argparse, html, importlib.util, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, webbrowser
from pathlib import Path

from fsdit.cli import CLIError, Parser, fail

# %%
import contextlib, io, os
from fastcore.test import test_eq, test_fail

# %% [markdown]
# ## What the app opens
#
# `RUN` is what `fsdit sample --run` takes: the `--out` folder of `fsdit train`, a folder of `fsdit export`,
# or the hub id (`user/name`) of an export (`fsdit.run.run_folder` fetches it). The explorer shows the
# classes of the run's feature store: the one its config names, else `feats/` beside it (the demo's
# layout), else the one `--feats` gives — an export names none. A folder that only holds runs is refused
# with one of them named.

# %%
#| export
RUN_HINT = "pass the --out folder of `fsdit train`, a folder of `fsdit export` or a hub id (user/name)"


def app_run(run, feats=None) -> tuple[Path, Path]:
    "The run folder and feature store `fsdit explore RUN` opens; `CLIError` saying what to pass otherwise."
    from fsdit.explorer import find_runs, find_store, is_run
    from fsdit.run import is_export, run_folder, saved_steps
    d = run_folder(run)
    if not d.exists(): raise CLIError(f"{run}: no such run folder: {RUN_HINT}")
    if not is_run(d):
        below = find_runs(d) if d.is_dir() else []
        raise CLIError(f"{d} is not a run (no config.json beside checkpoints/, not an export): "
                       + (f"it holds {len(below)} run(s), e.g. {below[0]}: pass one of them" if below else RUN_HINT))
    if not is_export(d) and not saved_steps(d):
        raise CLIError(f"{d} has no checkpoint yet: train it for at least `save_every` steps")
    store = Path(feats) if feats else find_store(d)
    if store is None:
        raise CLIError(f"{d} names no feature store and has no feats/ beside it: pass --feats STORE, the store it was trained on")
    if not (store / 'metadata.json').is_file():
        raise CLIError(f"--feats {store} is not a feature store (no metadata.json): pass the folder `fsdit precompute` wrote")
    return Path(os.path.abspath(d)), Path(os.path.abspath(store))   # the app's kernel runs in its own folder: relative paths would miss


def check_split(store, split: str) -> str:
    "Refuse (`CLIError`) a split with no images in the feature store."
    from fsdit.features import open_store
    have = [s for s in ('train', 'val', 'test') if len(open_store(store).rows(s))]
    if split not in have: raise CLIError(f"--split {split}: the store {store} has no {split} images; use one of {', '.join(have)}")
    return split


# %% [markdown]
# ## The app notebook
#
# One code cell, `explorer = show_explorer(RUN, feats=STORE, split=SPLIT)`, which displays `app_widget`: a
# title and the explorer widget (its run fixed) and nothing else — the assignment keeps the returned
# explorer from being displayed a second time. If the run cannot be opened in the kernel after all (a
# damaged checkpoint, say), the page shows one line saying why instead of a traceback.

# %%
#| export
def app_widget(run, feats=None, split: str | None = None):
    "The app's page and its explorer: a title and the `Explorer` of `run` (its run fixed), or one line saying why it could not open (explorer None)."
    import ipywidgets as W
    from fsdit.explorer import Explorer
    try: ex = Explorer(run, feats=feats, split=split)
    except Exception as e:
        why = html.escape(f'{type(e).__name__}: {e}')
        return W.HTML(f"<b class='fsdit-error' style='color:#b00'>fsdit explore: {why}</b>"), None
    ex.run_w.disabled = True
    return W.VBox([W.HTML('<h2>fsdit explorer</h2>'), ex.widget]), ex


def show_explorer(run, feats=None, split: str | None = None):
    "Display the explorer of `run` alone (the app's one cell); returns the `Explorer` (None if it could not open)."
    from IPython.display import display
    page, ex = app_widget(run, feats, split)
    display(page)
    return ex


def app_notebook(run, feats, split: str | None, folder) -> Path:
    "Write the app's one-cell notebook (`show_explorer` on `run`) into `folder`; returns its path."
    src = f"from fsdit.app import show_explorer\nexplorer = show_explorer({str(run)!r}, feats={str(feats)!r}, split={split!r})"
    nb = {'cells': [{'cell_type': 'code', 'execution_count': None, 'id': 'explorer', 'metadata': {}, 'outputs': [], 'source': src}],
          'metadata': {'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}},
          'nbformat': 4, 'nbformat_minor': 5}
    p = Path(folder) / 'fsdit explorer.ipynb'
    p.write_text(json.dumps(nb, indent=1))
    return p


# %% [markdown]
# ## Serving it
#
# Voilà listens on 127.0.0.1 only (nothing is exposed beyond this machine) and runs the notebook in a
# fresh kernel for each page load. `--port` defaults to Voilà's 8866, or a free port when that one is
# taken; a port given and taken is refused. Once the server answers, the URL is printed and opened in
# the browser (not with `--no-browser`, for a remote machine: forward the port, e.g. `ssh -L 8866:localhost:8866`).
# Ctrl-C (or SIGTERM) stops the server and removes the app notebook.

# %%
#| export
def voila_installed() -> bool: return importlib.util.find_spec('voila') is not None


def port_free(port: int) -> bool:
    "Whether a server can listen on 127.0.0.1:`port` (as Voilà binds it: SO_REUSEADDR)."
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try: s.bind(('127.0.0.1', port)); return True
        except OSError: return False


def free_port() -> int:
    "A port on 127.0.0.1 that is free now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def app_port(port: int | None, default: int = 8866) -> int:
    "`port` if free (`CLIError` if taken); with no `port`, `default` if free, else a free one."
    if port is None: return default if port_free(default) else free_port()
    if not port_free(port): raise CLIError(f"port {port} is in use: stop what listens there, or pick another with --port (e.g. --port {free_port()})")
    return port


def voila_command(notebook, port: int) -> list[str]:
    "The Voilà command line that serves `notebook` on 127.0.0.1:`port`, sources stripped, no browser of its own."
    return [sys.executable, '-m', 'voila', str(notebook), '--no-browser', f'--port={port}', '--Voila.ip=127.0.0.1',
            '--strip_sources=True', '--show_tracebacks=False', '--theme=light', '--Voila.log_level=WARN']


def _listening(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    "Wait until something listens on 127.0.0.1:`port`; False if `proc` exits first or `timeout` s pass."
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        try: socket.create_connection(('127.0.0.1', port), timeout=1).close(); return True
        except OSError: time.sleep(0.2)
    return False


# %%
#| export
def serve(notebook, port: int, browser: bool = True, name: str = 'the app', timeout: float = 120) -> int:
    "Serve `notebook` with Voilà at http://127.0.0.1:`port`/ until Ctrl-C or SIGTERM; print its URL once it answers."
    url = f'http://127.0.0.1:{port}/'
    proc = subprocess.Popen(voila_command(notebook, port), cwd=Path(notebook).parent)
    def stop(*_): raise KeyboardInterrupt
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        if not _listening(port, proc, timeout):
            return fail('explore', f"Voilà did not start serving on port {port} (exit status {proc.poll()}); its messages are above")
        print(f"{name}: {url} (Ctrl-C stops it)", flush=True)
        if browser: threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        return proc.wait()
    except KeyboardInterrupt: return 0
    finally:
        if main_thread: signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:
            proc.terminate()
            try: proc.wait(15)
            except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        shutil.rmtree(Path(notebook).parent, ignore_errors=True)


# %% [markdown]
# ## Command line
#
# `fsdit explore RUN [--port N] [--no-browser] [--split SPLIT] [--feats STORE]`. It opens on the held-out
# classes (`test`) when the store has them, as the explorer does; `--split` chooses another.

# %%
#| export
def port_number(text: str) -> int:
    "An argparse type: a TCP port, 1 to 65535."
    try: v = int(text)
    except ValueError: raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= v <= 65535: raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {v}")
    return v


def explore_parser() -> Parser:
    "The options of `fsdit explore`."
    p = Parser(prog='fsdit explore', description=explore_cli.__doc__)
    p.add_argument('run', metavar='RUN', help='run directory of `fsdit train`, a folder of `fsdit export` or its hub id (user/name)')
    p.add_argument('--port', type=port_number, default=None, metavar='N', help='port on 127.0.0.1 (default: 8866, or a free one if that is taken)')
    p.add_argument('--no-browser', action='store_true', help='only print the URL; open no browser')
    p.add_argument('--split', choices=('train', 'val', 'test'), default=None,
                   help='split whose classes to show first (default: test, the held-out classes)')
    p.add_argument('--feats', default=None, metavar='STORE', help="feature store of the run (default: the one its config names, or feats/ beside it)")
    return p


def explore_cli(argv: list[str]) -> int:
    "`fsdit explore RUN`: the explorer of a run as a web app on localhost (Voilà), opened in the browser."
    a = explore_parser().parse_args(argv)
    try:
        if not voila_installed(): raise CLIError("the app needs Voilà, which is not installed: pip install 'fsdit[app]'")
        run, store = app_run(a.run, a.feats)
        if a.split: check_split(store, a.split)
        port = app_port(a.port)
        nb = app_notebook(run, store, a.split, tempfile.mkdtemp(prefix='fsdit-explore-'))
    except (ValueError, OSError) as e:
        return fail('explore', e)
    return serve(nb, port, browser=not a.no_browser, name=f"the explorer of {run}")


# %% [markdown]
# ## Examples
#
# On a tiny demo run (trained in seconds; the folder comes from `FSDIT_EXPLORER_DIR` when set, as in the
# explorer's notebook): the run and its store are found, the app notebook holds the one call, and that
# call shows the explorer — the same object the notebook drives — opened on the held-out classes.

# %%
from fsdit.glyph.demo import demo
root = Path(os.environ.get('FSDIT_EXPLORER_DIR') or tempfile.mkdtemp()) / 'demo'
run_dir = demo(root, 'tiny', until='train', progress=False)['run']
test_eq(app_run(run_dir), (run_dir, root / 'feats'))
test_eq(app_run(os.path.relpath(run_dir))[0], Path(os.path.abspath(run_dir)))    # a relative RUN reaches the app as an absolute path
test_eq(check_split(root / 'feats', 'val'), 'val')
tmp = Path(tempfile.mkdtemp())
nb = json.loads(app_notebook(run_dir, root / 'feats', None, tmp).read_text())
test_eq([c['source'] for c in nb['cells']], [f"from fsdit.app import show_explorer\nexplorer = show_explorer({str(run_dir)!r}, feats={str(root / 'feats')!r}, split=None)"])
page, ex = app_widget(run_dir, feats=root / 'feats')
test_eq((ex.split_w.value, len(ex.supports), ex.run_w.disabled), ('test', 5, True))
test_eq(page.children[0].value, '<h2>fsdit explorer</h2>')                   # a title, then the explorer alone
kids = page.children[1].children
assert all(any(w is k for k in kids) for w in (ex.run_w, ex.gen_w, ex.support_box, ex.sample_box, ex.download_w))
page, ex = app_widget(tmp)
assert ex is None and page.value.startswith("<b class='fsdit-error'") and 'fsdit explore: ValueError: no run directory' in page.value


# %% [markdown]
# Refusals, each one line and exit status 1 before any server starts: no such run, a folder that only
# holds runs, a run without checkpoint, a split the store lacks, a taken port, no Voilà.

# %%
def refusal(*argv) -> str:
    with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(explore_cli([str(a) for a in argv]), 1)
    lines = err.getvalue().splitlines(); test_eq(len(lines), 1); assert lines[0].startswith('fsdit explore: ')
    return lines[0]
assert 'no such run folder' in refusal(tmp / 'nope') and 'hub id' in refusal(tmp / 'nope')
assert f"it holds 1 run(s), e.g. {run_dir}: pass one of them" in refusal(root)
(tmp / 'fresh' / 'checkpoints').mkdir(parents=True); (tmp / 'fresh' / 'config.json').write_text('{}')
assert 'has no checkpoint yet' in refusal(tmp / 'fresh')
assert 'is not a feature store' in refusal(run_dir, '--feats', tmp)
shutil.copytree(run_dir, tmp / 'alone' / 'run')                  # a run whose config names no store, none beside it
cfg = json.loads((tmp / 'alone' / 'run' / 'config.json').read_text()); cfg.pop('feats')
(tmp / 'alone' / 'run' / 'config.json').write_text(json.dumps(cfg))
assert 'pass --feats STORE' in refusal(tmp / 'alone' / 'run')
test_eq(app_run(tmp / 'alone' / 'run', root / 'feats'), (tmp / 'alone' / 'run', root / 'feats'))
test_fail(lambda: check_split(root / 'feats', 'extra'), contains='has no extra images; use one of train, val, test')
with socket.socket() as s:
    s.bind(('127.0.0.1', 0)); s.listen(); taken = s.getsockname()[1]
    assert f'port {taken} is in use' in refusal(run_dir, '--port', taken, '--no-browser')
    assert app_port(None, taken) != taken                      # the default port taken: another one
_installed, voila_installed = voila_installed, lambda: False
assert "pip install 'fsdit[app]'" in refusal(run_dir)
voila_installed = _installed
test_eq(voila_command(tmp / 'a.ipynb', 8000)[3:7], [str(tmp / 'a.ipynb'), '--no-browser', '--port=8000', '--Voila.ip=127.0.0.1'])
for bad in ('0', '70000', 'x'):
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try: explore_parser().parse_args(['r', '--port', bad]); raise AssertionError(bad)
        except SystemExit as e: test_eq(e.code, 2)
    assert err.getvalue().startswith('fsdit explore: argument --port: ') and len(err.getvalue().splitlines()) == 1
test_eq(vars(explore_parser().parse_args(['r'])), {'run': 'r', 'port': None, 'no_browser': False, 'split': None, 'feats': None})

# %% [markdown]
# The server itself, with a browser clicking in the page, is tested in `tests/test_browser.py`; it looks like this:
#
# ![The explorer app in a browser](images/explorer_app.png)
