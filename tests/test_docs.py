"""The documentation site builds, and every page shows its math, its API docs and its figures.

The site is rendered by Quarto (`nbdev_docs`, run by .github/workflows/deploy.yaml), which cannot be installed here.
This test runs everything up to Quarto's rendering and replaces that last step by pandoc, the converter Quarto is
built on, reading the same notebooks with the same markdown extensions (math between dollars in particular). The
processing (nbdev_proc_nbs on a copy of the repository) and the rendering (pandoc, as Quarto reads a notebook) are
in tests/docs_site.py, shared with tests/test_site_browser.py, which loads the same pages in a browser.

Checks on every page, fast and without running the chapters (their stored outputs are what the pages show):
- the page title is the chapter's `# Title`;
- every `$...$` and `$$...$$` of the markdown (outside code) is a math span in the HTML, counted inline and
  displayed separately -- a stray dollar, an unclosed delimiter or markdown eating a `_` changes a count;
- every function and class the chapter exports has its `show_doc` heading;
- every image output of the processed notebook, and every image its markdown links (`![...](images/...)`), is an
  `<img>` whose file pandoc extracted; a small notebook with a matplotlib figure checks that the conversion and the
  counting themselves work.
The site configuration is checked too: nbs/_quarto.yml (what nbdev reads) is a symlink to the top-level
_quarto.yml, math is rendered with KaTeX or MathJax, the home page exists, and the sidebar lists it and then every
chapter in reading order -- the order of the chapters' numbers -- each exactly once.

pandoc is a system package (Debian/Ubuntu: `apt-get install -y pandoc`); without it the test fails and says so.
"""
import ast, base64, io, json, re
from pathlib import Path

import pytest
import yaml

from docs_site import NBS, ROOT, chapter_paths, directives, render

IMAGE_TYPES = ('image/png', 'image/jpeg', 'image/svg+xml')


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


MARKDOWN_IMAGE = re.compile(r'!\[[^\]]*\]\([^)]+\)|<img\b')


def markdown_images(notebook: dict) -> int:
    "Images the markdown shows (`![alt](images/...)` or <img>), code excluded: the results of long runs, for instance."
    return sum(len(MARKDOWN_IMAGE.findall(CODE_SPAN.sub('', FENCED_CODE.sub('', ''.join(c['source'])))))
               for c in notebook['cells'] if c['cell_type'] == 'markdown')


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
    assert config['format']['html'].get('css') == 'styles.css', "the site's style sheet is nbs/styles.css"
    assert config['format']['html'].get('code-overflow') == 'wrap', (
        "code must wrap on the site as on the pages the tests render (nbs/styles.css)")
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
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'long_run.png').write_bytes(buffer.getvalue())
    prose = dict(cell_type='markdown', metadata={}, source='Costs $5 or $x_1 + y$, with `$not math$` and\n$$\\sum_i x_i$$\nand $\\alpha$.'
                 '\n\n![a long run](images/long_run.png) and `![not an image](x.png)`')
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
    assert image_outputs(converted) == 1 and markdown_images(converted) == 1 and len(images) == 2
    assert all(p.is_file() and p.stat().st_size > 100 for p in images)
    with pytest.raises(AssertionError, match='missing.png'):
        path.write_text(json.dumps({**notebook, 'cells': [dict(cell_type='markdown', metadata={}, source='![](images/missing.png)')]}))
        render(path, tmp_path, pandoc)


@pytest.mark.parametrize('name', [p.name for p in chapter_paths()])
def test_chapter_page(name, processed, site):
    "One page: title, math, API docs and figures, checked against the chapter it came from (in the same copy)."
    _, html, converted = site.page(name)
    source = processed / 'nbs' / name
    title = chapter_title(source)
    assert re.search(rf'<title>\s*{re.escape(title)}\s*</title>', html), f"{name}: the page title is not {title!r}"
    assert markdown_math(converted) == html_math(html), (
        f"{name}: (inline, display) math in the markdown {markdown_math(converted)} != math spans in the HTML {html_math(html)}")
    headings = {h.strip() for h in re.findall(r'<h3[^>]*>(.*?)</h3>', html, re.S)}
    undocumented = [n for n in exported_names(source) if n not in headings]
    assert not undocumented, f"{name}: no show_doc section for {undocumented}"
    images = extracted_images(html)
    expected = image_outputs(converted) + markdown_images(converted)
    assert len(images) == expected, (f"{name}: {image_outputs(converted)} image outputs and {markdown_images(converted)} "
                                     f"images in the markdown, {len(images)} <img> in the HTML")
    assert all(p.is_file() and p.stat().st_size > 0 for p in images), f"{name}: an image file was not extracted"
