"""Every line of code in the chapters fits the page: at most 100 characters.

The site shows a chapter's code cells as they are, and scrolls a code block sideways when a line
is wider than the page, so a reader loses the end of the line. Only code cells are checked (prose
wraps by itself). A failure names the chapter, the cell index (counting every cell, as
`json.load(...)['cells']` does), the line number within the cell, its length and the line.
"""
import json
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / 'nbs'
LIMIT = 100


def chapters() -> list[Path]:
    return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))


def long_lines(path: Path) -> list[str]:
    "Every code line of the chapter longer than LIMIT, as 'cell I, line J (N characters): text'."
    found = []
    for i, cell in enumerate(json.loads(path.read_text())['cells']):
        if cell['cell_type'] != 'code': continue
        source = cell['source'] if isinstance(cell['source'], str) else ''.join(cell['source'])
        for j, line in enumerate(source.split('\n')):
            if len(line) > LIMIT:
                found.append(f'cell {i}, line {j} ({len(line)} characters): {line}')
    return found


@pytest.mark.parametrize('path', chapters(), ids=lambda p: p.stem)
def test_code_lines_fit_the_page(path):
    found = long_lines(path)
    assert not found, (f"{path.name}: {len(found)} code line(s) longer than {LIMIT} characters "
                       "(the site scrolls sideways beyond that); rewrap them:\n" + '\n'.join(found))


def test_the_check_sees_a_long_line(tmp_path):
    "A code line of LIMIT characters passes, one of LIMIT + 1 is reported; prose is not checked."
    code = ['a = 1\n', 'b' * LIMIT + '\n', 'c' * (LIMIT + 1)]
    notebook = {'cells': [{'cell_type': 'markdown', 'source': ['x' * 300]},
                          {'cell_type': 'code', 'source': code}]}
    path = tmp_path / 'toy.ipynb'
    path.write_text(json.dumps(notebook))
    assert long_lines(path) == [f"cell 1, line 2 ({LIMIT + 1} characters): {'c' * (LIMIT + 1)}"]
