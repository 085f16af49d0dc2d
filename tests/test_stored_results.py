"""A plain "Run All" (without HVAE_SLOW=1) shows the long runs' stored results and loses none of them.

A long cell (`#| slow`) runs its body only when HVAE_SLOW=1; otherwise its `else` branch calls `show_stored(text,
*images)`, which prints the stored text and displays figures kept under nbs/images/. Checked here, from the
notebooks alone, for the chapters listed: every long cell has that branch; the figures it names exist and are, byte
for byte, the figures stored in the cell's outputs (the run made with `--slow`), as many as were stored; and every
line the stored run printed is among the lines the branch prints (a cell whose stored output is itself the branch's
message, "Not run here...", is compared with nothing).
"""
import ast, base64, json, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
sys.path.insert(0, str(ROOT / 'tools'))
from execute_chapters import directives, source  # noqa: E402

CHAPTERS = ['09_vdvae', '09a_autoregressive']


def long_cells(name: str) -> list[tuple[int, dict]]:
    cells = json.loads((NBS / f'{name}.ipynb').read_text())['cells']
    return [(i, c) for i, c in enumerate(cells) if c['cell_type'] == 'code' and 'slow' in directives(c)]


def stored_branch(cell: dict):
    "The arguments of the `show_stored` call in the `else` branch of `if os.environ.get('HVAE_SLOW')`."
    code = '\n'.join(line for line in source(cell).splitlines() if not line.startswith('#|'))
    for node in ast.parse(code).body:
        if isinstance(node, ast.If) and 'HVAE_SLOW' in ast.unparse(node.test):
            for statement in node.orelse:
                call = getattr(statement, 'value', None)
                if isinstance(call, ast.Call) and getattr(call.func, 'id', '') == 'show_stored':
                    return [ast.literal_eval(a) for a in call.args] + \
                           [ast.literal_eval(k.value) for k in call.keywords]
    return None


def arguments(cell: dict) -> tuple[str, list[str]]:
    "(the text, the image names) that the cell's `show_stored` shows."
    values = stored_branch(cell)
    texts = [v for v in values if not v.endswith('.png')]
    return (texts[0] if texts else ''), [v for v in values if v.endswith('.png')]


@pytest.mark.parametrize('name', CHAPTERS)
def test_every_long_cell_shows_its_stored_result(name):
    cells = long_cells(name)
    assert cells, f"{name} has no long cell: drop it from this test's list"
    missing = [i for i, c in cells if stored_branch(c) is None]
    assert not missing, (f"{name}: the long cells {missing} have no `else: show_stored(...)` branch, so a plain Run "
                         "All replaces their stored result")


@pytest.mark.parametrize('name', CHAPTERS)
def test_stored_figures_are_the_ones_shown(name):
    for index, cell in long_cells(name):
        _, images = arguments(cell)
        stored = [base64.b64decode(o['data']['image/png']) for o in cell.get('outputs', [])
                  if 'image/png' in o.get('data', {})]
        assert len(images) == len(stored), (f"{name}, cell {index}: {len(stored)} stored figures, but a Run All "
                                            f"shows {len(images)}")
        for image, png in zip(images, stored):
            path = NBS / 'images' / image
            assert path.exists(), f"{name}, cell {index}: nbs/images/{image} is missing"
            assert path.read_bytes() == png, (f"{name}, cell {index}: nbs/images/{image} is not the figure stored "
                                              "in the cell: extract it again from the cell's output")


@pytest.mark.parametrize('name', CHAPTERS)
def test_stored_text_is_the_text_shown(name):
    for index, cell in long_cells(name):
        text, _ = arguments(cell)
        printed = ''.join(''.join(o.get('text', '')) for o in cell.get('outputs', [])
                          if o.get('output_type') == 'stream')
        if not printed.strip() or printed.startswith('Not run here'): continue
        shown = {line.strip() for line in text.splitlines()}
        lost = [line for line in printed.splitlines() if line.strip() and line.strip() not in shown]
        assert not lost, f"{name}, cell {index}: a Run All would not show the stored lines {lost[:3]}"
