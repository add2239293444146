"""Check that each idea of the package has one owner, by reading `fsdit/*.py` with `ast` (nothing is imported).

    python tools/import_graph.py     # prints the report; exit 1 if a check fails

Checks (a failure exits 1):
  - one function builds a device mesh (calls `Mesh(...)`): `fsdit.utils.data_mesh`;
  - `l2_normalize` is defined only in `fsdit.utils`;
  - no module is over 450 lines (`_modidx.py`, generated, is not counted);
  - no branch on the conditioning's name (`cond ==`, `!=`, `in`, `not in`; `cond` or `<x>.cond`) outside
    `fsdit.conds`, which owns the conditionings, and `fsdit.config`, which validates the name;
  - `latent_scale` is mentioned in at most two modules: `fsdit.features`, where the store records the VAE's
    factor, and `fsdit.run`, which reads it back from a run's config.json; everything else gets a
    `fsdit.utils.LatentScaling` that applies it;
  - no library module imports from a command module or imports a `*_cli` function. The command modules are
    `fsdit.cli`, `fsdit.app` and those of `fsdit.commands` (named `commands.<name>` here); they may import
    the library, never the reverse;
  - no core library module imports the glyph demo (`fsdit.glyph`: its data, encoder, judge and demo, named
    `glyph.<name>` here) at module level: a core module that needs it imports it inside the function that does,
    so the library loads without the demo. The glyph modules and the command modules may import it.
Reported, not failed:
  - the branches on `cond` per module;
  - the notebook cells over 60 lines, per notebook text form in `nbs/text/` (first line and length of each).
"""
import ast, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'fsdit'
TEXT = ROOT / 'nbs' / 'text'
COMMAND_MODULES = {'cli', 'app'}     # with every module of the `commands` subpackage
COMMAND_PACKAGE = 'commands'
GLYPH_PACKAGE = 'glyph'               # the glyph demo, its judge and its data: not part of the core library
MAX_LINES = 450
MAX_CELL_LINES = 60
COND_OWNERS = {'conds', 'config'}     # the conditionings' module, and the config that validates `cond`
MAX_LATENT_SCALE_MODULES = 2          # the store that records the VAE's factor, the run folder's reader


def modules(pkg: Path = PKG) -> dict[str, tuple[str, ast.Module]]:
    """Module name -> (source, tree) for every module of the package and its subpackages but the generated `_modidx`;
    a subpackage's module is named with dots (`commands.train`), its `__init__.py` by the subpackage (`commands`)."""
    out = {}
    for p in sorted(pkg.rglob('*.py')):
        if p.stem == '_modidx' or '__pycache__' in p.parts: continue
        parts = p.relative_to(pkg).with_suffix('').parts
        if parts[-1] == '__init__': parts = parts[:-1]
        if not parts: continue                                   # the package's own __init__
        src = p.read_text()
        out['.'.join(parts)] = (src, ast.parse(src, str(p)))
    return out


def is_command(module: str | None) -> bool:
    "Whether a package module (`cli`, `commands.train`, ...) is a command module."
    return bool(module) and (module in COMMAND_MODULES or module.split('.')[0] == COMMAND_PACKAGE)


def is_glyph(module: str | None) -> bool:
    "Whether a package module (`glyph`, `glyph.demo`, ...) is part of the glyph demo's subpackage."
    return bool(module) and module.split('.')[0] == GLYPH_PACKAGE


def is_core(module: str | None) -> bool:
    "Whether a package module is a core library module: neither a command module nor one of the glyph demo."
    return bool(module) and not is_command(module) and not is_glyph(module)


def _imported_modules(node: ast.ImportFrom, importer: str) -> list[str]:
    """The package modules an `ImportFrom` in module `importer` reads from (`.cli`, `..cli` or `fsdit.cli` -> 'cli';
    `from . import commands` -> 'commands'); empty when outside the package."""
    mod = node.module or ''
    if node.level == 0:
        return [mod.split('.', 1)[1]] if mod.startswith('fsdit.') else []
    base = importer.split('.')[:-1]                              # the importer's package, relative to fsdit
    if node.level - 1 > len(base): return []
    base = base[:len(base) - (node.level - 1)]
    if mod: return ['.'.join(base + [mod])]
    return ['.'.join(base + [a.name]) for a in node.names]       # `from . import x`: x may be a module


def command_imports(mods: dict) -> list[str]:
    "`module: from X import names` for each library module importing from a command module or importing a `*_cli`."
    out = []
    for name, (_, tree) in mods.items():
        if is_command(name): continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                srcs, names = _imported_modules(node, name), [a.name for a in node.names]
                if any(map(is_command, srcs)) or any(n.endswith('_cli') for n in names):
                    out.append(f"{name}: from {(srcs[0] if len(srcs) == 1 else None) or node.module} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith('fsdit.') and is_command(a.name.split('.', 1)[1]): out.append(f"{name}: import {a.name}")
    return out


def _module_level(tree: ast.Module):
    "The nodes run when the module is imported: everything but the bodies of functions and lambdas."
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo += node.decorator_list if not isinstance(node, ast.Lambda) else []
            continue
        yield node
        todo += list(ast.iter_child_nodes(node))


def glyph_imports(mods: dict) -> list[str]:
    "`module: from X import names` for each core library module importing the glyph subpackage at module level."
    out = []
    for name, (_, tree) in mods.items():
        if not is_core(name): continue
        for node in _module_level(tree):
            if isinstance(node, ast.ImportFrom):
                srcs, names = _imported_modules(node, name), [a.name for a in node.names]
                if node.level == 0 and node.module == 'fsdit': srcs = names               # `from fsdit import glyph`
                if any(map(is_glyph, srcs)):
                    out.append(f"{name}: from {(srcs[0] if len(srcs) == 1 else None) or node.module} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith('fsdit.') and is_glyph(a.name.split('.', 1)[1]): out.append(f"{name}: import {a.name}")
    return out


class _MeshCalls(ast.NodeVisitor):
    "The innermost enclosing function of each `Mesh(...)` / `x.Mesh(...)` call (`<module>` at top level)."
    def __init__(self): self.stack, self.found = ['<module>'], []

    def _func(self, node):
        self.stack.append(getattr(node, 'name', '<lambda>')); self.generic_visit(node); self.stack.pop()
    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _func

    def visit_Call(self, node):
        f = node.func
        if (isinstance(f, ast.Name) and f.id == 'Mesh') or (isinstance(f, ast.Attribute) and f.attr == 'Mesh'):
            self.found.append(self.stack[-1])
        self.generic_visit(node)


def mesh_builders(mods: dict) -> list[str]:
    "`module.function` of each function that calls `Mesh(...)` (a function calling it twice counts once)."
    out = []
    for name, (_, tree) in mods.items():
        v = _MeshCalls(); v.visit(tree)
        out += [f"{name}.{f}" for f in dict.fromkeys(v.found)]
    return out


def definitions(mods: dict, fn: str) -> list[str]:
    "The modules that define a function `fn` (at any depth)."
    return [name for name, (_, tree) in mods.items()
            if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == fn for n in ast.walk(tree))]


def _is_cond(node) -> bool:
    return (isinstance(node, ast.Name) and node.id == 'cond') or (isinstance(node, ast.Attribute) and node.attr == 'cond')


def cond_branches(mods: dict) -> dict[str, int]:
    "Per module, the comparisons of `cond` / `<x>.cond` by `==`, `!=`, `in`, `not in` on either side (modules with none left out)."
    ops = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
    out = {}
    for name, (_, tree) in mods.items():
        n = sum(1 for c in ast.walk(tree) if isinstance(c, ast.Compare) and isinstance(c.ops[0], ops)
                and (_is_cond(c.left) or _is_cond(c.comparators[0])))
        if n: out[name] = n
    return out


def long_cells(text: Path = TEXT, limit: int = MAX_CELL_LINES) -> dict[str, list[tuple[int, int]]]:
    "Per notebook text form (percent format), (first line, length) of each cell over `limit` lines; its `# %%` line and trailing blank lines are not counted."
    out = {}
    for p in sorted(text.glob('*.py')):
        lines = p.read_text().splitlines()
        starts = [i for i, l in enumerate(lines) if l.startswith('# %%')]
        for a, b in zip(starts, starts[1:] + [len(lines)]):
            n = len('\n'.join(lines[a + 1:b]).rstrip().splitlines())
            if n > limit: out.setdefault(p.stem, []).append((a + 1, n))
    return out


def report(pkg: Path = PKG, text: Path = TEXT) -> dict:
    "Everything the checks look at, as plain data."
    mods = modules(pkg)
    return dict(
        mesh_builders=mesh_builders(mods),
        l2_normalize_defined_in=definitions(mods, 'l2_normalize'),
        long_modules={n: len(s.splitlines()) for n, (s, _) in mods.items() if len(s.splitlines()) > MAX_LINES},
        command_imports=command_imports(mods),
        glyph_imports=glyph_imports(mods),
        latent_scale_modules=[n for n, (s, _) in mods.items() if 'latent_scale' in s],
        cond_branches=cond_branches(mods),
        long_cells=long_cells(text),
        modules=list(mods),
        n_modules=len(mods))


def failures(r: dict) -> list[str]:
    "The failed checks of a report, one line each."
    out = []
    if len(r['mesh_builders']) != 1: out.append(f"{len(r['mesh_builders'])} functions build a Mesh (want 1): {r['mesh_builders']}")
    if r['l2_normalize_defined_in'] != ['utils']: out.append(f"l2_normalize is defined in {r['l2_normalize_defined_in']} (want ['utils'])")
    if r['long_modules']: out.append(f"modules over {MAX_LINES} lines: {r['long_modules']}")
    stray = {m: n for m, n in r['cond_branches'].items() if m not in COND_OWNERS}
    if stray: out.append(f"branches on the conditioning's name outside {sorted(COND_OWNERS)}: {stray}")
    ls = r['latent_scale_modules']
    if len(ls) > MAX_LATENT_SCALE_MODULES:
        out.append(f"latent_scale is mentioned in {len(ls)} modules (want at most {MAX_LATENT_SCALE_MODULES}; pass a LatentScaling): {ls}")
    if r['command_imports']:
        out.append(f"library modules import from a command module or import a *_cli: {r['command_imports']}")
    if r['glyph_imports']:
        out.append(f"core library modules import the glyph demo ({GLYPH_PACKAGE}.*) at module level (import it in the function "
                   f"that needs it): {r['glyph_imports']}")
    return out


def main() -> int:
    r = report()
    print(f"{r['n_modules']} modules in fsdit/ ({sum(map(is_command, r['modules']))} command modules: "
          f"{', '.join(m for m in r['modules'] if is_command(m))})")
    print(f"Mesh built in: {', '.join(r['mesh_builders']) or 'nowhere'}")
    print(f"l2_normalize defined in: {', '.join(r['l2_normalize_defined_in']) or 'nowhere'}")
    print(f"modules over {MAX_LINES} lines: {r['long_modules'] or 'none'}")
    print(f"library modules importing from a command module or a *_cli (failed above 0): {len(r['command_imports'])}")
    for line in r['command_imports']: print(f"  {line}")
    glyph = [m for m in r['modules'] if is_glyph(m)]
    print(f"core library modules importing the glyph demo ({', '.join(glyph)}) at module level (failed above 0): "
          f"{len(r['glyph_imports'])}")
    for line in r['glyph_imports']: print(f"  {line}")
    print(f"modules mentioning latent_scale (failed above {MAX_LATENT_SCALE_MODULES}): {len(r['latent_scale_modules'])}: {', '.join(r['latent_scale_modules'])}")
    cb = r['cond_branches']
    print(f"branches on `cond` (failed outside {', '.join(sorted(COND_OWNERS))}): {sum(cb.values())} in {len(cb)} modules: "
          + ', '.join(f"{k} {v}" for k, v in sorted(cb.items(), key=lambda kv: -kv[1])))
    lc = r['long_cells']
    print(f"notebook cells over {MAX_CELL_LINES} lines (reported, not failed): {sum(map(len, lc.values()))} in {len(lc)} notebooks")
    for nb, cells in lc.items(): print(f"  {nb}: " + ', '.join(f"{n} lines at line {i}" for i, n in cells))
    bad = failures(r)
    for line in bad: print(f"FAIL: {line}")
    print('FAIL' if bad else 'ok')
    return 1 if bad else 0


if __name__ == '__main__': sys.exit(main())
