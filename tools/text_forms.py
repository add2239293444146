"""Keep the notebooks' text forms and README.md in step with `nbs/*.ipynb` (jupytext does the conversion).

    python tools/text_forms.py write          # ipynb -> nbs/text/*.py (percent format) and README.md
    python tools/text_forms.py check          # exit 1 if any text form or README.md is out of step
    python tools/text_forms.py build F.py ... # text form -> notebook (for authoring in an editor)

The notebooks are the source. The percent-format text forms exist for review (a diff of a notebook is
unreadable) and for editing in any editor; README.md is `nbs/index.ipynb` rendered to Markdown.
"""
import sys
from pathlib import Path
import jupytext

ROOT = Path(__file__).resolve().parents[1]
NBS, TEXT = ROOT / 'nbs', ROOT / 'nbs' / 'text'
CLEAN = {'notebook_metadata_filter': '-all', 'cell_metadata_filter': '-all'}


def _text_of(nb_path: Path) -> str:
    nb = jupytext.read(nb_path)
    nb.metadata.setdefault('jupytext', {}).update(CLEAN)
    return jupytext.writes(nb, fmt='py:percent')


def _readme() -> str:
    "README.md: the markdown cells of index.ipynb, and its visible code cells as Python blocks."
    nb = jupytext.read(NBS / 'index.ipynb')
    parts = ['<!-- Generated from nbs/index.ipynb by tools/text_forms.py; edit the notebook, not this file. -->']
    for c in nb.cells:
        src = c.source.strip()
        if not src or src.startswith('#| hide'): continue
        parts.append(src if c.cell_type == 'markdown' else f"```python\n{src}\n```")
    return '\n\n'.join(parts) + '\n'


def expected() -> dict:
    out = {TEXT / (p.stem + '.py'): _text_of(p) for p in sorted(NBS.glob('*.ipynb'))}
    if (NBS / 'index.ipynb').exists(): out[ROOT / 'README.md'] = _readme()
    return out


def main(argv):
    cmd = argv[0] if argv else 'check'
    if cmd == 'build':
        for f in map(Path, argv[1:]):
            nb = jupytext.read(f, fmt='py:percent')
            nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
            jupytext.write(nb, NBS / (f.stem + '.ipynb'), fmt='ipynb')
            print('wrote', NBS / (f.stem + '.ipynb'))
        return 0
    want = expected()
    stale = [p for p, s in want.items() if not p.exists() or p.read_text(encoding='utf-8') != s]
    orphans = [p for p in TEXT.glob('*.py') if p not in want] if TEXT.exists() else []
    if cmd == 'write':
        TEXT.mkdir(exist_ok=True)
        for p in stale: p.write_text(want[p], encoding='utf-8')
        for p in orphans: p.unlink()
        return 0
    if stale or orphans:
        for p in stale: print('out of step:', p.relative_to(ROOT))
        for p in orphans: print('no notebook for:', p.relative_to(ROOT))
        print('run `make sync` and commit the result')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
