"""Write README.md from nbs/index.ipynb: the markdown cells, in order, with chapter links pointing into nbs/.

nbdev_readme needs Quarto, which cannot be installed on every machine; this produces the same content without it.
Run `python tools/make_readme.py` after editing nbs/index.ipynb (tests/test_readme.py checks the two agree)."""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def readme_text(notebook: Path = ROOT / 'nbs' / 'index.ipynb') -> str:
    cells = json.loads(notebook.read_text())['cells']
    parts = [''.join(c['source']).strip() for c in cells if c['cell_type'] == 'markdown']
    text = '\n\n'.join(parts) + '\n'
    text = re.sub(r'\]\((\w+)\.ipynb\)', r'](nbs/\1.ipynb)', text)
    return '<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n' + text

if __name__ == '__main__':
    (ROOT / 'README.md').write_text(readme_text())
    sys.exit(0)
