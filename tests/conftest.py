"""Fixtures shared by several test files: the docs checks' site (tests/test_docs.py, tests/test_site_browser.py: one
processing, one rendering) and a tiny trained run (tests/shared_runs.py: tests/test_evaluate.py, test_errors.py,
test_train.py).

The README's test command runs the files on two pytest-xdist workers (`-n 2 --dist loadgroup`). Each file is one
group, so its module fixtures are built once, on one worker; the two docs files share a group, so the site is
processed and rendered once for both. A session fixture (the tiny run) is built once on each worker that needs it."""
import shutil

import pytest

from docs_site import RenderedSite, process_notebooks
from shared_runs import snapshot, train_tiny_run


@pytest.fixture(scope='session')
def pandoc() -> str:
    path = shutil.which('pandoc')
    if path is None:
        pytest.fail("pandoc is not installed: the docs checks convert every chapter with it (apt-get install -y pandoc)")
    return path


@pytest.fixture(scope='session')
def processed(tmp_path_factory):
    "A copy of the repository in which nbdev_proc_nbs wrote the notebooks processed for Quarto to `_proc/`."
    return process_notebooks(tmp_path_factory.mktemp('docs'))


@pytest.fixture(scope='session')
def site(processed, pandoc) -> RenderedSite:
    "The chapters' pages, rendered by pandoc into the processed copy's `_proc/`, once for both checks."
    return RenderedSite(processed, pandoc)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    """A finished run of tests/shared_runs.py's recipe, shared by every test of this worker: read it, or copy it
    (`shutil.copytree`) before writing into it. At the end of the session the directory must be as it was trained."""
    folder = train_tiny_run(tmp_path_factory.mktemp('tiny_run') / 'run')
    trained = snapshot(folder)
    yield folder
    now = snapshot(folder)
    changed = sorted(str(p.relative_to(folder)) for p in trained.keys() | now.keys() if trained.get(p) != now.get(p))
    if changed: pytest.fail(f"a test wrote into the shared tiny run instead of a copy: {', '.join(changed)}")


SHARED_GROUPS = {'test_docs.py': 'site', 'test_site_browser.py': 'site'}


def pytest_collection_modifyitems(config, items):
    "One xdist group per test file (the docs files share one): a file's fixtures are built on one worker only."
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(name, name)))


@pytest.fixture(autouse=True)
def _accelerate_state_of_its_own():
    """Accelerate keeps one state per process and refuses an Accelerator of another precision after it: each test
    starts without one (a worker runs many tests in one process), and leaves none behind: a session fixture (the tiny
    run) is built before the next test's own reset."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
