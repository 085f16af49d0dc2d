"""The chapters are committed executed, and their outputs are those of their current code.

tools/execute_chapters.py runs a chapter and records in its metadata the hash of its code cells and of the code of
every hvae_nb module it runs (those it imports, and those these import); this test fails, naming the chapter, what
changed and the command that re-executes it, when a chapter that has code to run
- was never executed by the script, or its code changed since, or the code of a module it runs changed since (the
  failure names the module: a chapter that prints a config shows the fields of the config it was executed with),
- stores no output at all (saved after "Clear All Outputs", for instance),
- stores an error or a traceback in an output,
- has a long (`#| slow`) cell that does not wait for HVAE_SLOW=1, so that JupyterLab's Run All would start it.
It also keeps the repository light: all of nbs/ under 15 MB, and no image (an output or a file under nbs/) larger
than a figure needs.
"""
import base64, json, struct, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
sys.path.insert(0, str(ROOT / 'tools'))
from execute_chapters import (chapter_paths, code_sha256, directives, is_skipped, module_sha256,  # noqa: E402
                              recorded_sha256, skip_flags, source, stale_reasons)

NBS_LIMIT = 15 * 2**20
# a figure of the house (dpi 80-100, at most ~12 inches wide) is well within these; a sample grid too
IMAGE_BYTES_LIMIT = 500 * 2**10
IMAGE_SIDE_LIMIT = 2000


def rerun(path: Path) -> str:
    return f"re-run it: `python tools/execute_chapters.py nbs/{path.name}` (then commit the notebook)"


def run_cells(notebook: dict) -> list[tuple[int, dict]]:
    "The code cells the script runs (not the `#| slow`, `eval: false` ones), with their indices."
    flags = skip_flags(ROOT)
    return [(i, c) for i, c in enumerate(notebook['cells']) if not is_skipped(c, flags)]


def error_outputs(notebook: dict) -> list[str]:
    "An 'error' output, or a traceback printed to a stream, as 'cell N: what'."
    found = []
    for index, cell in enumerate(notebook['cells']):
        for output in cell.get('outputs', []):
            text = ''.join(output.get('text', ''))
            if output.get('output_type') == 'error':
                found.append(f"cell {index}: {output.get('ename')}: {output.get('evalue', '')[:200]}")
            elif 'Traceback (most recent call last)' in text:
                found.append(f"cell {index}: a traceback in its {output.get('name', 'output')}: ...{text.strip()[-200:]}")
    return found


@pytest.mark.parametrize('name', [p.name for p in chapter_paths(NBS)])
def test_chapter_is_executed(name):
    path = NBS / name
    notebook = json.loads(path.read_text())
    cells = run_cells(notebook)
    if not cells: return  # nothing to run (a page of prose)
    reasons = stale_reasons(notebook)
    assert not reasons, (f"{name}: {'; '.join(reasons)}, so its stored outputs may not be what the code computes "
                         f"now; {rerun(path)}")
    assert any(c.get('outputs') for _, c in cells), f"{name} stores no output (were they cleared?); {rerun(path)}"
    errors = error_outputs(notebook)
    assert not errors, f"{name} stores errors in its outputs: fix the chapter, then {rerun(path)}\n" + '\n'.join(errors)


@pytest.mark.parametrize('name', [p.name for p in chapter_paths(NBS)])
def test_long_cells_wait_for_hvae_slow(name):
    "JupyterLab's Run All runs `#| slow` cells too: their long body must run only when HVAE_SLOW=1."
    flags = skip_flags(ROOT)
    unguarded = [i for i, c in enumerate(json.loads((NBS / name).read_text())['cells'])
                 if c['cell_type'] == 'code' and flags & directives(c).keys() and 'HVAE_SLOW' not in source(c)]
    assert not unguarded, (f"{name}: the long cells {unguarded} run in a plain Run All: run their body only when "
                           f"os.environ.get('HVAE_SLOW') == '1', and otherwise show the stored result of the long run")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'
    return struct.unpack('>II', data[16:24])


def images() -> list[tuple[str, bytes, str]]:
    "(where, bytes, MIME type) of every image output of a chapter and every image file under nbs/."
    found = []
    for path in chapter_paths(NBS):
        for index, cell in enumerate(json.loads(path.read_text())['cells']):
            for output in cell.get('outputs', []):
                for kind, data in output.get('data', {}).items():
                    if not kind.startswith('image/'): continue
                    text = ''.join(data) if isinstance(data, list) else data
                    found.append((f"{path.name}, cell {index}", text.encode() if kind == 'image/svg+xml' else base64.b64decode(text), kind))
    for path in NBS.rglob('*'):
        if path.suffix.lower() in ('.png', '.jpg', '.jpeg', '.svg', '.gif') and '.ipynb_checkpoints' not in path.parts:
            found.append((str(path.relative_to(ROOT)), path.read_bytes(), 'image/png' if path.suffix.lower() == '.png' else 'image'))
    return found


def test_nbs_stays_small():
    files = [p for p in NBS.rglob('*') if p.is_file() and '.ipynb_checkpoints' not in p.parts]
    total = sum(p.stat().st_size for p in files)
    largest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:5]
    assert total < NBS_LIMIT, (f"nbs/ holds {total / 2**20:.1f} MB, more than {NBS_LIMIT / 2**20:.0f} MB; the largest files: "
                               + ', '.join(f"{p.relative_to(ROOT)} ({p.stat().st_size / 2**20:.1f} MB)" for p in largest))


def test_images_are_modest():
    too_large = []
    for where, data, kind in images():
        if len(data) > IMAGE_BYTES_LIMIT: too_large.append(f"{where}: {len(data) / 2**10:.0f} kB")
        if kind == 'image/png':
            width, height = png_size(data)
            if max(width, height) > IMAGE_SIDE_LIMIT: too_large.append(f"{where}: {width}x{height} pixels")
    assert not too_large, (f"images over {IMAGE_BYTES_LIMIT // 2**10} kB or {IMAGE_SIDE_LIMIT} pixels a side (draw figures "
                           f"at dpi 80-100 and a modest figsize, save PNG):\n" + '\n'.join(too_large))


def test_the_checks_see_a_changed_module(tmp_path):
    """The module record itself, on a small package: a chapter that imports `a`, which imports `b` (relatively, as
    nbdev writes it) and starts `c` by name; `d` is imported by nobody. Rewording a comment or a docstring of `b`
    leaves the chapter fresh; changing its code makes the chapter stale, and the reason names `b`."""
    package = tmp_path / 'hvae_nb'
    package.mkdir()
    files = {'__init__.py': '__version__ = "1"\n',
             'a.py': '"A."\nfrom .b import twice\nCOMMAND = "python -m hvae_nb.c"\n',
             'b.py': '"B."\ndef twice(x):\n    "Doubles."\n    return 2 * x  # why\n',
             'c.py': 'print(1)\n', 'd.py': 'print(2)\n'}
    for name, text in files.items(): (package / name).write_text(text)
    code = lambda text: dict(cell_type='code', execution_count=None, metadata={}, source=text, outputs=[])
    notebook = dict(cells=[code('from hvae_nb.a import COMMAND\n%time print(COMMAND)')], metadata={})
    notebook['metadata']['hvae_nb'] = {'code_sha256': code_sha256(notebook),
                                       'module_sha256': module_sha256(notebook, package)}
    assert sorted(notebook['metadata']['hvae_nb']['module_sha256']) == [
        'hvae_nb/__init__.py', 'hvae_nb/a.py', 'hvae_nb/b.py', 'hvae_nb/c.py']
    assert stale_reasons(notebook, package) == []
    (package / 'b.py').write_text('"B, reworded."\ndef twice(x):\n    "Twice x."\n    return 2 * x  # because\n')
    assert stale_reasons(notebook, package) == []
    (package / 'b.py').write_text('"B."\ndef twice(x):\n    "Doubles."\n    return 3 * x\n')
    assert stale_reasons(notebook, package) == [
        'the code of hvae_nb/b.py, which it runs, changed since it was executed']
    (package / 'a.py').write_text(files['a.py'] + 'from . import d\n')
    assert any('it now runs hvae_nb/d.py' in r for r in stale_reasons(notebook, package))
    del notebook['metadata']['hvae_nb']['module_sha256']
    assert any('before the script recorded' in r for r in stale_reasons(notebook, package))


def test_the_checks_see_a_stale_or_failed_chapter():
    "The checks themselves, on a small notebook: an edited cell, an edited slow cell, a stored error."
    code = lambda text, outputs=(): dict(cell_type='code', execution_count=None, metadata={}, source=text, outputs=list(outputs))
    printed = dict(output_type='stream', name='stdout', text='4\n')
    notebook = dict(cells=[dict(cell_type='markdown', metadata={}, source='# T'), code('print(2 + 2)', [printed]),
                           code('#| slow\ntrain()'), code('#| eval: false\nmain()')], metadata={})
    notebook['metadata']['hvae_nb'] = {'code_sha256': code_sha256(notebook)}
    assert [i for i, _ in run_cells(notebook)] == [1]
    assert recorded_sha256(notebook) == code_sha256(notebook) and not error_outputs(notebook)
    for index in (1, 2):
        edited = json.loads(json.dumps(notebook))
        edited['cells'][index]['source'] += '  # edited'
        assert recorded_sha256(edited) != code_sha256(edited)
    notebook['cells'][1]['outputs'].append(dict(output_type='error', ename='ValueError', evalue='bad', traceback=[]))
    notebook['cells'][2]['outputs'].append(dict(output_type='stream', name='stderr', text='Traceback (most recent call last):\n  x\n'))
    assert [e.split(':')[0] for e in error_outputs(notebook)] == ['cell 1', 'cell 2']
