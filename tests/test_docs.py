"""The documentation site builds, and every page shows its math, its API docs and its figures.

The site is rendered by Quarto (`nbdev_docs`, run by .github/workflows/deploy.yaml), which cannot be installed here.
This test runs everything up to Quarto's rendering and replaces that last step by pandoc, the converter Quarto is
built on, reading the same notebooks with the same markdown extensions (math between dollars in particular):

1. `nbdev_proc_nbs` on a copy of the repository (the working tree is not touched). It runs nbdev's notebook
   processors -- front matter from each chapter's title cell, a `show_doc` cell after every exported function and
   class, hidden cells removed -- and executes what the docs need: exported cells, `show_doc` cells and every cell
   that contains an import. A chapter that mixes an import with code that depends on other cells fails here, as it
   would fail the deploy workflow. `nbdev_proc_nbs` looks for Quarto and would try to install it; a stub `quarto`
   that fails when run stands in for it (nbdev_proc_nbs only looks it up).
2. pandoc `-f ipynb -t html5 --standalone --mathjax` on every processed chapter, after three small steps that make
   pandoc read the notebook as Quarto does: the front-matter cell becomes the document's metadata, the markdown
   output of `#| output: asis` cells (the `show_doc` cells) becomes markdown, and the code of `#| echo: false` cells
   is dropped. (Ubuntu's pandoc 2.x also rejects `execute_result` outputs without an execution count, which nbdev
   writes; they become `display_data`, which renders the same.)
3. Checks on every page, fast and without running the chapters:
   - the page title is the chapter's `# Title`;
   - every `$...$` and `$$...$$` of the markdown (outside code) is a math span in the HTML, counted inline and
     displayed separately -- a stray dollar, an unclosed delimiter or markdown eating a `_` changes a count;
   - every function and class the chapter exports has its `show_doc` heading;
   - every image output of the processed notebook is an `<img>` whose file pandoc extracted. The chapters are
     committed without outputs (executing all of them takes minutes, too slow for this test), so on most pages
     this count is zero; the image outputs nbdev's processing produces are checked, and a small notebook with a
     matplotlib figure checks that the conversion and the counting themselves work.
4. The site configuration: nbs/_quarto.yml (what nbdev reads) is a symlink to the top-level _quarto.yml, math is
   rendered with KaTeX or MathJax, the home page exists, and the sidebar lists it and then every chapter in
   reading order -- the order of the chapters' numbers -- each exactly once.

pandoc is a system package (Debian/Ubuntu: `apt-get install -y pandoc`); without it the test fails and says so.
"""
import ast, base64, io, json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
IMAGE_TYPES = ('image/png', 'image/jpeg', 'image/svg+xml')


def chapter_paths() -> list[Path]:
    "The notebooks of the site: nbs/*.ipynb except those nbdev skips (names starting with '_' or '.')."
    return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))


@pytest.fixture(scope='module')
def pandoc() -> str:
    path = shutil.which('pandoc')
    if path is None:
        pytest.fail("pandoc is not installed: the docs check converts every chapter with it (apt-get install -y pandoc)")
    return path


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
    stub.write_text('#!/bin/sh\necho "quarto is not installed here; tests/test_docs.py only processes notebooks" >&2\nexit 1\n')
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


@pytest.fixture(scope='module')
def processed(tmp_path_factory) -> Path:
    "A copy of the repository in which nbdev_proc_nbs wrote the notebooks processed for Quarto to `_proc/`."
    base = tmp_path_factory.mktemp('docs')
    copy = copy_repository(base / 'repo')
    environment = {**os.environ, 'PATH': f"{quarto_stub(base / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
                   'PYTHONPATH': str(copy), 'MPLBACKEND': 'Agg'}
    done = subprocess.run([sys.executable, '-c', 'from nbdev.quarto import nbdev_proc_nbs; nbdev_proc_nbs()'],
                          cwd=copy, env=environment, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"nbdev_proc_nbs failed:\n{processing_failure(done.stderr)}"
    return copy


# ---- 2. the notebook as Quarto reads it, converted by pandoc ------------------------------------------------------

def directives(cell: dict) -> dict:
    "The `#| key: value` lines at the top of a cell, as {key: value}."
    found = {}
    for line in ''.join(cell.get('source', '')).splitlines():
        if not line.startswith('#|'): break
        key, _, value = line[2:].strip().partition(':')
        parts = key.split()
        if parts: found[parts[0]] = value.strip() if value else ' '.join(parts[1:])
    return found


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


def render(notebook_path: Path, folder: Path, pandoc: str) -> tuple[str, dict]:
    "Standalone HTML of a processed notebook, its images extracted into `folder`; also the notebook as converted."
    notebook = json.loads(notebook_path.read_text())
    converted = as_quarto_reads_it(notebook)
    source, metadata = folder / notebook_path.name, folder / f'{notebook_path.stem}.yaml'
    source.write_text(json.dumps(converted))
    metadata.write_text(yaml.safe_dump({k: v for k, v in front_matter(notebook).items() if isinstance(v, str)}))
    done = subprocess.run([pandoc, '-f', 'ipynb', '-t', 'html5', '--standalone', '--mathjax', f'--metadata-file={metadata}',
                           f'--extract-media={folder / (notebook_path.stem + "_media")}', str(source)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pandoc could not convert {notebook_path.name}: {done.stderr}"
    return done.stdout, converted


# ---- 3. what a page must show ----------------------------------------------------------------------------------------

FENCED_CODE = re.compile(r'^[ \t]*(```+|~~~+).*?^[ \t]*\1', re.M | re.S)
CODE_SPAN = re.compile(r'(`+).+?\1', re.S)
DISPLAY_MATH = re.compile(r'(?<!\\)\$\$(.+?)\$\$', re.S)
# pandoc's rule for inline math: a non-space right after the opening $ and right before the closing one, which must
# not be followed by a digit; no blank line inside
INLINE_MATH = re.compile(r'(?<![\\$])\$(?=\S)((?:[^$\\\n]|\\.|\n(?![ \t]*\n))+?)(?<=\S)\$(?!\d)')


def count_math(markdown: str) -> tuple[int, int]:
    "Inline and display math in markdown, code excluded."
    text = CODE_SPAN.sub('', FENCED_CODE.sub('', markdown))
    display = len(DISPLAY_MATH.findall(text))
    return len(INLINE_MATH.findall(DISPLAY_MATH.sub(' ', text))), display


def markdown_math(notebook: dict) -> tuple[int, int]:
    counts = [count_math(''.join(c['source'])) for c in notebook['cells'] if c['cell_type'] == 'markdown']
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def html_math(html: str) -> tuple[int, int]:
    return html.count('class="math inline"'), html.count('class="math display"')


def exported_names(notebook_path: Path) -> list[str]:
    "Functions and classes nbdev gives a show_doc: top level in exported cells that are not hidden, no leading _."
    names = []
    for cell in json.loads(notebook_path.read_text())['cells']:
        options = directives(cell)
        if cell['cell_type'] != 'code' or not {'export', 'exports', 'exec_doc'} & set(options): continue
        if 'hide' in options or options.get('include') == 'false': continue
        try: tree = ast.parse(''.join(cell['source']))
        except SyntaxError: continue
        names += [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and (not n.name.startswith('_') or n.name.startswith('__'))]
    return names


def image_outputs(notebook: dict) -> int:
    return sum(any(t in o.get('data', {}) for t in IMAGE_TYPES) for c in notebook['cells'] for o in c.get('outputs', []))


def extracted_images(html: str) -> list[Path]:
    return [Path(src) for src in re.findall(r'<img\s[^>]*?src="([^"]+)"', html, re.S)]


def chapter_title(notebook_path: Path) -> str:
    first = json.loads(notebook_path.read_text())['cells'][0]
    heading = ''.join(first['source']).strip().splitlines()[0]
    assert first['cell_type'] == 'markdown' and heading.startswith('# '), f"{notebook_path.name} does not start with a '# Title' cell"
    return heading[2:].strip()


# ---- the tests -------------------------------------------------------------------------------------------------------

def sidebar_pages(contents: list) -> list[str]:
    "The pages of a Quarto sidebar, in order, sections flattened."
    pages = []
    for item in contents:
        if isinstance(item, str): pages.append(item)
        elif 'contents' in item: pages += ([item['href']] if 'href' in item else []) + sidebar_pages(item['contents'])
        elif 'href' in item: pages.append(item['href'])
    return pages


def test_site_configuration():
    link = NBS / '_quarto.yml'
    assert link.is_symlink() and link.resolve() == (ROOT / '_quarto.yml').resolve(), "nbs/_quarto.yml must be a symlink to ../_quarto.yml"
    config = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    assert config['format']['html'].get('html-math-method') in ('katex', 'mathjax'), "math must be rendered"
    assert (NBS / 'index.ipynb').exists(), "the home page nbs/index.ipynb is missing"
    expected = ['index.ipynb'] + [p.name for p in chapter_paths() if p.name != 'index.ipynb']
    listed = sidebar_pages(config['website']['sidebar']['contents'])
    assert listed == expected, (f"the sidebar in _quarto.yml must list the home page, then every chapter in reading order:\n"
                                f"  listed:   {listed}\n  expected: {expected}")


def test_conversion_shows_math_and_figures(tmp_path, pandoc):
    "The checker itself: a notebook with two inline formulas, one displayed, a show_doc-like output and a figure."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    plt.figure(figsize=(1, 1)); plt.plot([0, 1]); plt.savefig(buffer, format='png'); plt.close()
    picture = base64.b64encode(buffer.getvalue()).decode()
    front = dict(cell_type='raw', metadata={}, source='---\ntitle: A small chapter\n---\n')
    prose = dict(cell_type='markdown', metadata={}, source='Costs $5 or $x_1 + y$, with `$not math$` and\n$$\\sum_i x_i$$\nand $\\alpha$.')
    doc = dict(cell_type='code', execution_count=0, metadata={}, source='#| echo: false\n#| output: asis\nshow_doc(f)',
               outputs=[dict(output_type='execute_result', execution_count=None, metadata={},
                             data={'text/markdown': '### f\n\n*Returns $f(x)$.*', 'text/plain': 'f'})])
    figure = dict(cell_type='code', execution_count=1, metadata={}, source='plt.plot([0, 1])',
                  outputs=[dict(output_type='display_data', metadata={}, data={'image/png': picture, 'text/plain': '<Figure>'})])
    notebook = dict(nbformat=4, nbformat_minor=5, metadata={}, cells=[front, prose, doc, figure])
    path = tmp_path / 'small.ipynb'
    path.write_text(json.dumps(notebook))
    html, converted = render(path, tmp_path, pandoc)
    assert re.search(r'<title>\s*A small chapter\s*</title>', html)
    assert markdown_math(converted) == html_math(html) == (3, 1)
    assert re.search(r'<h3[^>]*>\s*f\s*</h3>', html) and 'show_doc(f)' not in html
    images = extracted_images(html)
    assert image_outputs(converted) == len(images) == 1 and images[0].is_file() and images[0].stat().st_size > 100


@pytest.mark.parametrize('name', [p.name for p in chapter_paths()])
def test_chapter_page(name, processed, pandoc, tmp_path):
    "One page: title, math, API docs and figures, checked against the chapter it came from (in the same copy)."
    html, converted = render(processed / '_proc' / name, tmp_path, pandoc)
    source = processed / 'nbs' / name
    title = chapter_title(source)
    assert re.search(rf'<title>\s*{re.escape(title)}\s*</title>', html), f"{name}: the page title is not {title!r}"
    assert markdown_math(converted) == html_math(html), (
        f"{name}: (inline, display) math in the markdown {markdown_math(converted)} != math spans in the HTML {html_math(html)}")
    headings = {h.strip() for h in re.findall(r'<h3[^>]*>(.*?)</h3>', html, re.S)}
    undocumented = [n for n in exported_names(source) if n not in headings]
    assert not undocumented, f"{name}: no show_doc section for {undocumented}"
    images = extracted_images(html)
    assert len(images) == image_outputs(converted), f"{name}: {image_outputs(converted)} image outputs, {len(images)} <img> in the HTML"
    assert all(p.is_file() and p.stat().st_size > 0 for p in images), f"{name}: an image file was not extracted"
