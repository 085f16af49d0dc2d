"Fixtures shared by the docs checks (tests/test_docs.py, tests/test_site_browser.py): one processing, one rendering."
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
