"""Fixtures shared by the docs checks (tests/test_docs.py, tests/test_site_browser.py): one processing, one rendering.

The README's test command runs the files on two pytest-xdist workers (`-n 2 --dist loadgroup`). Each file is one
group, so its module fixtures (a trained run, a rendered site) are built once, on one worker; the two docs files
share a group, so the site is processed and rendered once for both."""
import shutil

import pytest

from docs_site import RenderedSite, process_notebooks


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


SHARED_GROUPS = {'test_docs.py': 'site', 'test_site_browser.py': 'site'}


def pytest_collection_modifyitems(config, items):
    "One xdist group per test file (the docs files share one): a file's fixtures are built on one worker only."
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(name, name)))
