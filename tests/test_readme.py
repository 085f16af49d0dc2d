"README.md is generated from nbs/index.ipynb; this fails when someone edits one without regenerating the other."
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
from make_readme import readme_text

def test_readme_is_generated_from_index():
    assert (ROOT / 'README.md').read_text() == readme_text(), "README.md is stale: run `python tools/make_readme.py`"

def test_readme_test_command_is_what_ci_runs():
    "The README's test command appears verbatim in .ci/run."
    readme, ci = (ROOT / 'README.md').read_text(), (ROOT / '.ci' / 'run').read_text()
    command = 'nbdev_test && pytest -n 2 --dist loadgroup tests'
    assert command in readme and command in ci
