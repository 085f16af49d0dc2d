"""The documentation site as tests/test_docs.py and tests/test_site_browser.py see it: the chapters processed by
nbdev on a copy of the repository, then converted to standalone HTML pages by pandoc, as Quarto would.

1. `process_notebooks`: `nbdev_proc_nbs` on a copy of the repository (the working tree is not touched). It runs
   nbdev's notebook processors -- front matter from each chapter's title cell, a `show_doc` cell after every
   exported function and class, hidden cells removed -- and executes what the docs need: exported cells, `show_doc`
   cells and every cell that contains an import; the other cells keep their stored outputs. A chapter that mixes an
   import with code that depends on other cells fails here, as it would fail the deploy workflow.
   `nbdev_proc_nbs` looks for Quarto and would try to install it; a stub `quarto` that fails when run stands in for
   it (nbdev_proc_nbs only looks it up). It copies the other files of nbs/ (images/ in particular) beside the
   processed notebooks in `_proc/`.
2. `render`: pandoc `-f ipynb+link_attributes -t html5 --standalone --katex` on a processed chapter, with the site's
   nbs/styles.css in the page (Quarto adds it to every page: `css: styles.css` in _quarto.yml), after three small
   steps that make pandoc read the notebook as Quarto does: the front-matter cell becomes the document's metadata, the markdown
   output of `#| output: asis` cells (the `show_doc` cells) becomes markdown, and the code of `#| echo: false`
   cells is dropped. (Ubuntu's pandoc 2.x also rejects `execute_result` outputs without an execution count, which
   nbdev writes; they become `display_data`, which renders the same.) The page is written beside the processed
   notebook, its images extracted into `<chapter>_media/`, images the markdown links (`images/...`) included.
   Quarto's markdown reads link attributes (`[source](url){target="_blank"}`, which every `show_doc` heading
   writes); pandoc's ipynb reader does so only with its `link_attributes` extension, turned on here.
   Math is left to KaTeX in the browser, as on the published site: the page loads KaTeX from KATEX_URL, the address
   pandoc's (and so Quarto's) pages use, and renders every math span with pandoc's own script.

pandoc is a system package (Debian/Ubuntu: `apt-get install -y pandoc`).
"""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
sys.path.insert(0, str(ROOT / 'tools'))
from execute_chapters import chapter_paths, directives  # noqa: E402  (one definition of both, shared with the tool)

# what the pages load KaTeX from: pandoc 3's default, which Quarto's html-math-method: katex uses; the browser check
# answers these requests from a local copy of the katex npm package
KATEX_URL = 'https://cdn.jsdelivr.net/npm/katex@latest/dist/'
# the site's own style sheet, which Quarto puts in every page after its theme
STYLES = NBS / 'styles.css'
# pandoc's ipynb reader with the one extension Quarto's markdown has and it lacks by default
PANDOC_FORMAT = 'ipynb+link_attributes'

__all__ = ['ROOT', 'NBS', 'KATEX_URL', 'STYLES', 'PANDOC_FORMAT', 'chapter_paths', 'directives', 'process_notebooks', 'front_matter',
           'as_quarto_reads_it', 'render', 'RenderedSite']


# ---- 1. nbdev's processing, on a copy -------------------------------------------------------------------------------

def copy_repository(destination: Path) -> Path:
    skip = shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints', 'runs', 'data', '_proc', '_docs')
    destination.mkdir(parents=True)
    for name in ('settings.ini', '_quarto.yml'): shutil.copy2(ROOT / name, destination / name)
    shutil.copytree(NBS, destination / 'nbs', symlinks=True, ignore=skip)
    shutil.copytree(ROOT / 'hvae_nb', destination / 'hvae_nb', ignore=skip)
    return destination


def quarto_stub(folder: Path) -> Path:
    folder.mkdir()
    stub = folder / 'quarto'
    stub.write_text('#!/bin/sh\necho "quarto is not installed here; the docs checks only process notebooks" >&2\nexit 1\n')
    stub.chmod(0o755)
    return folder


def processing_failure(stderr: str) -> str:
    "The part of nbdev's output that says what failed, without its many warnings."
    lines = [l for l in stderr.splitlines() if 'UserWarning' not in l and not l.startswith('  warn(')]
    start = max((i for i, l in enumerate(lines) if l.startswith('Exception: Error in notebook')), default=max(0, len(lines) - 40))
    causes = [l for l in lines[:start] if re.match(r'[\w.]+(Error|Exception): ', l) and 'Error in notebook' not in l]
    hint = ("\n(nbdev executes every cell that contains an import while building the docs: keep imports in cells of "
            "their own, see nbdev's FAQ on 'cells containing imports and other code')")
    return '\n'.join(lines[start:start + 40] + causes[-1:]) + hint


def process_notebooks(base: Path) -> Path:
    "A copy of the repository under `base` in which nbdev_proc_nbs wrote the notebooks processed for Quarto to `_proc/`."
    copy = copy_repository(base / 'repo')
    environment = {**os.environ, 'PATH': f"{quarto_stub(base / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
                   'PYTHONPATH': str(copy), 'MPLBACKEND': 'Agg'}
    done = subprocess.run([sys.executable, '-c', 'from nbdev.quarto import nbdev_proc_nbs; nbdev_proc_nbs()'],
                          cwd=copy, env=environment, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"nbdev_proc_nbs failed:\n{processing_failure(done.stderr)}"
    return copy


# ---- 2. the notebook as Quarto reads it, converted by pandoc ------------------------------------------------------

def front_matter(notebook: dict) -> dict:
    "The YAML of the first cell, when it is a raw front-matter cell (nbdev writes one from the `# Title` cell)."
    first = notebook['cells'][0] if notebook['cells'] else {}
    text = ''.join(first.get('source', ''))
    if first.get('cell_type') != 'raw' or not text.startswith('---'): return {}
    return yaml.safe_load(text.strip().strip('-')) or {}


def as_quarto_reads_it(notebook: dict) -> dict:
    "Front matter out of the cells, asis markdown outputs as markdown cells, echo: false code dropped."
    cells = notebook['cells'][1:] if front_matter(notebook) else notebook['cells']
    result = []
    for cell in cells:
        if cell['cell_type'] != 'code': result.append(cell); continue
        options = directives(cell)
        markdown = [o for o in cell.get('outputs', []) if 'text/markdown' in o.get('data', {})]
        asis = options.get('output') == 'asis'
        outputs = [o for o in cell.get('outputs', []) if not (asis and o in markdown)]
        for output in outputs:
            if output.get('output_type') == 'execute_result' and output.get('execution_count') is None:
                output['output_type'] = 'display_data'; output.pop('execution_count', None)
        if options.get('echo') != 'false' or outputs: result.append({**cell, 'outputs': outputs})
        if asis: result += [dict(cell_type='markdown', metadata={}, source=o['data']['text/markdown']) for o in markdown]
    return {**notebook, 'cells': result}


def render(notebook_path: Path, folder: Path, pandoc: str, styles: Path | None = STYLES) -> tuple[str, dict]:
    """Standalone HTML of a processed notebook, written to `folder/<name>.html` with its images extracted into
    `folder/<name>_media/`; also the notebook as converted. Images the markdown links are looked up from the
    notebook's folder, as Quarto does. `styles` (the site's style sheet; None: pandoc's defaults only) is written
    into the page's head."""
    notebook = json.loads(notebook_path.read_text())
    converted = as_quarto_reads_it(notebook)
    work = folder / '.pandoc'
    work.mkdir(parents=True, exist_ok=True)
    source, metadata = work / notebook_path.name, work / f'{notebook_path.stem}.yaml'
    header = work / f'{notebook_path.stem}_head.html'
    source.write_text(json.dumps(converted))
    metadata.write_text(yaml.safe_dump({k: v for k, v in front_matter(notebook).items() if isinstance(v, str)}))
    header.write_text(f'<style>\n{styles.read_text()}\n</style>\n' if styles else '')
    page = folder / f'{notebook_path.stem}.html'
    done = subprocess.run([pandoc, '-f', PANDOC_FORMAT, '-t', 'html5', '--standalone', f'--katex={KATEX_URL}',
                           f'--metadata-file={metadata}', f'--include-in-header={header}',
                           f'--extract-media={folder / (notebook_path.stem + "_media")}',
                           '-o', str(page), str(source)],
                          cwd=notebook_path.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pandoc could not convert {notebook_path.name}: {done.stderr}"
    missing = re.findall(r'Could not fetch resource (\S+)', done.stderr)
    assert not missing, f"{notebook_path.name} links images that do not exist beside it: {missing}"
    return page.read_text(), converted


class RenderedSite:
    "The pages of the processed chapters, each rendered the first time it is asked for, beside its notebook."
    def __init__(self, processed: Path, pandoc: str):
        self.folder, self.pandoc, self.pages = processed / '_proc', pandoc, {}

    def page(self, name: str) -> tuple[Path, str, dict]:
        "(the HTML file, its text, the notebook as converted) of the chapter `name` (e.g. '03_lvae.ipynb')."
        if name not in self.pages:
            html, converted = render(self.folder / name, self.folder, self.pandoc)
            self.pages[name] = (self.folder / f'{Path(name).stem}.html', html, converted)
        return self.pages[name]
