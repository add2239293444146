"""tools/import_graph.py: one function builds the device mesh, `l2_normalize` lives in `fsdit.utils`, no module over
450 lines, no branch on the conditioning's name outside `fsdit.conds` (and the config's validation), `latent_scale` in
`fsdit.features` and `fsdit.run` only, no library module importing a command module (`cli`, `app`, `commands.*`) or a
`*_cli`, no core library module importing the glyph demo (`glyph.*`) at module level; the tool exits 0 on the
package and names each failure on a copy that breaks them; notebook cells over 60 lines are reported, not failed."""
import importlib.util, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('import_graph', ROOT / 'tools' / 'import_graph.py')
G = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(G)


def test_package_passes():
    r = G.report()
    assert r['mesh_builders'] == ['utils.data_mesh']
    assert r['l2_normalize_defined_in'] == ['utils']
    assert r['long_modules'] == {}
    assert set(r['cond_branches']) <= G.COND_OWNERS, r['cond_branches']
    assert r['latent_scale_modules'] == ['features', 'run']
    assert r['command_imports'] == [] and r['glyph_imports'] == []
    assert {'glyph.data', 'glyph.encoder', 'glyph.judge', 'glyph.demo'} <= {m for m in r['modules'] if G.is_glyph(m)}
    assert not G.is_core('glyph.demo') and not G.is_core('commands.demo') and G.is_core('codecs')
    assert {'cli', 'app', 'commands.train', 'commands.prepare'} <= {m for m in r['modules'] if G.is_command(m)}
    assert not G.is_command('launch') and not G.is_command('data')
    assert G.failures(r) == []
    p = subprocess.run([sys.executable, str(ROOT / 'tools' / 'import_graph.py')], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.rstrip().endswith('ok'), p.stdout + p.stderr


def test_failures_are_named(tmp_path):
    (tmp_path / 'a.py').write_text("from jax.sharding import Mesh\ndef m(): return Mesh([], ('x',))\n"
                                   "def l2_normalize(x): return x\n" + "x = 1\n" * 451)
    (tmp_path / 'b.py').write_text("import jax\nm = lambda: jax.sharding.Mesh([], ('x',))\nfrom .cli import fail\n"
                                   "from .demo import demo_cli\n"
                                   "def f(mc, cond): return mc.cond == 'class' or 'x' != cond or mc.cond in ('a',) or 'b' not in mc.cond\n")
    (tmp_path / 'conds.py').write_text("def f(cfg): return cfg.cond == 'class'\n")   # the owner may
    (tmp_path / 'commands').mkdir(); (tmp_path / 'commands' / '__init__.py').write_text('')
    (tmp_path / 'commands' / 'x.py').write_text("from ..b import f\nfrom ..cli import fail\ndef x_cli(argv): return 0\n")  # a command may
    (tmp_path / 'c.py').write_text("from .commands.x import x_cli\nfrom .commands import x\nimport fsdit.commands.x\n")
    for m in ('a', 'b', 'conds'): (tmp_path / f'{m}.py').write_text((tmp_path / f'{m}.py').read_text() + "latent_scale = 1.0\n")
    r = G.report(tmp_path)
    assert r['mesh_builders'] == ['a.m', 'b.<lambda>'] and r['l2_normalize_defined_in'] == ['a']
    assert list(r['long_modules']) == ['a'] and len(r['command_imports']) == 5
    assert r['command_imports'][:2] == ['b: from cli import fail', 'b: from demo import demo_cli']
    assert r['command_imports'][2:] == ['c: from commands.x import x_cli', 'c: from commands import x', 'c: import fsdit.commands.x']
    assert r['cond_branches'] == {'b': 4, 'conds': 1}
    assert len(G.failures(r)) == 6 and "outside ['conds', 'config']: {'b': 4}" in G.failures(r)[-3]
    assert "latent_scale is mentioned in 3 modules" in G.failures(r)[-2] and r['latent_scale_modules'] == ['a', 'b', 'conds']
    assert "library modules import from a command module" in G.failures(r)[-1] and 'b: from demo import demo_cli' in G.failures(r)[-1]


def test_glyph_imports_at_module_level_fail(tmp_path):
    "A core module may import the glyph demo inside a function only; the glyph modules and the commands may at module level."
    (tmp_path / 'glyph').mkdir(); (tmp_path / 'glyph' / '__init__.py').write_text('')
    (tmp_path / 'glyph' / 'demo.py').write_text("from ..a import f\nfrom .judge import j\n")
    (tmp_path / 'commands').mkdir(); (tmp_path / 'commands' / '__init__.py').write_text('')
    (tmp_path / 'commands' / 'demo.py').write_text("from ..glyph.demo import demo\n")
    (tmp_path / 'a.py').write_text("def f():\n    from fsdit.glyph.encoder import E\n    return E\n")
    (tmp_path / 'b.py').write_text("from .glyph.judge import j\nimport fsdit.glyph.data\nfrom . import glyph\n"
                                   "if True:\n    from fsdit import glyph\nclass C:\n    from .glyph import demo\n")
    r = G.report(tmp_path)
    assert r['glyph_imports'] == ['b: from glyph.judge import j', 'b: import fsdit.glyph.data', 'b: from glyph import glyph',
                                  'b: from glyph import glyph', 'b: from glyph import demo'], r['glyph_imports']
    assert r['command_imports'] == [] and 'glyph demo' in G.failures(r)[-1]            # the last of 3 (no Mesh, no l2_normalize)


def test_long_cells_reported_not_failed(tmp_path):
    cell = lambda n: '# %%\n' + 'x = 1\n' * n + '\n\n'      # trailing blank lines are not counted
    (tmp_path / 'a.py').write_text('# %% [markdown]\n# # A\n\n' + cell(60) + cell(61))
    (tmp_path / 'b.py').write_text(cell(3))
    assert G.long_cells(tmp_path) == {'a': [(67, 61)]}     # the second cell's '# %%' is line 67
    r = G.report(text=tmp_path)
    assert r['long_cells'] == {'a': [(67, 61)]} and G.failures(r) == []
