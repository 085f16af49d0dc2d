"""README.md is generated from nbs/index.ipynb, and its test command is the one CI runs, in CI's environment."""
import re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
from make_readme import readme_text

def test_readme_is_generated_from_index():
    assert (ROOT / 'README.md').read_text() == readme_text(), "README.md is stale: run `python tools/make_readme.py`"

def readme_test_block() -> list[str]:
    "The lines of the README's shell block that runs the tests."
    blocks = re.findall(r'```sh\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)
    found = [b.splitlines() for b in blocks if re.search(r'^nbdev_test', b, re.M)]
    assert len(found) == 1, "the README must show one shell block that runs nbdev_test"
    return found[0]

def test_readme_test_command_is_what_ci_runs():
    "The README's test command is a line of .ci/run, and the environment it exports is CI's."
    block, ci = readme_test_block(), (ROOT / '.ci' / 'run').read_text()
    command = next(line for line in block if line.startswith('nbdev_test'))
    assert re.search(r'nbdev_test .*--do_print.* && pytest ', command), "the command shows each notebook as it ends"
    assert command in [line.strip() for line in ci.splitlines()], f".ci/run does not run the README's {command!r}"
    exported = dict(re.findall(r'(\w+)=(\S+)', next(line for line in block if line.startswith('export '))))
    assert set(exported) == {'OMP_NUM_THREADS', 'MPLBACKEND', 'HVAE_DATA'}, exported
    for name, value in exported.items():
        set_by_ci = re.search(rf'^export {name}=(.+)$', ci, re.M)
        assert set_by_ci, f".ci/run does not set {name}, which the README's test command needs"
        if name != 'HVAE_DATA': assert set_by_ci.group(1) == value, (name, set_by_ci.group(1), value)
