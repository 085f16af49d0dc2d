"""Every page of the site, opened in a real browser, shows its figures and its maths.

The pages are those of tests/test_docs.py (nbdev_proc_nbs on a copy, then pandoc, as Quarto reads a notebook: see
tests/docs_site.py), loaded in headless Chromium driven by Playwright. Like the published site, a page renders its
maths with KaTeX in the browser, with the script pandoc and Quarto write (`katex.render` on every math span,
`throwOnError: false`, so a formula KaTeX cannot parse is shown as red source text of class `katex-error`). The
page asks for KaTeX at the CDN address the site uses; the check answers those requests from a local copy of the
`katex` npm package and refuses every other request to the network, so nothing is fetched from a CDN. Per page:
- KaTeX loaded (on a page with maths) and the page raised no JavaScript error;
- every <img> decoded, with a non-zero width and height;
- every formula rendered: none is a `katex-error`, each math span holds KaTeX's output;
- nothing wider than the page: every code block (`<pre>`) and every displayed formula either fits its box (long code
  lines wrap, see nbs/styles.css) or scrolls inside a box that lies within the page and shows a scroll bar; the
  browser draws scroll bars as a reader's does (Playwright's headless default, `--hide-scrollbars`, is turned off,
  so a box that scrolls looks like one in the screenshots too);
- no markdown left as text: link attributes such as `{target="_blank" style="..."}`, which every `show_doc` heading
  writes after its `source` link and Quarto reads, must not show as raw text outside code.
A failure names the page, and the formula with KaTeX's error message, the image, the block or the raw text.

With HVAE_SCREENSHOTS=<folder>, every page is also saved there as `<chapter>.png` (the whole page),
`<chapter>_top.png` (the first screen) and `<chapter>_figure.png` (the screen that shows its first image).

Needs (installed by .ci/run): Debian's `chromium` (`apt-get install -y chromium`; Playwright's own browser download
is not used: the browser is launched from its path, HVAE_CHROMIUM or the first of chromium, chromium-browser,
google-chrome on the PATH), the `playwright` Python package (dev extras) and npm, which installs katex@KATEX_VERSION
into ~/.cache/hvae_nb/ the first time (or set HVAE_KATEX to a folder holding katex.min.js, katex.min.css, fonts/).
"""
import base64, io, json, os, re, shutil, subprocess, time
from collections import Counter
from pathlib import Path

import pytest

from docs_site import KATEX_URL, STYLES, chapter_paths, render

KATEX_VERSION = '0.19.1'
# what the page shows, and each formula again with throwOnError: the page's own rendering (throwOnError: false) shows
# an undefined command in red inside an otherwise rendered formula, without any error class to find
PAGE_CHECK = r"""() => {
  const loaded = typeof katex !== 'undefined', macros = {};
  return {
    katex: loaded,
    images: Array.from(document.images, image => ({
      src: image.getAttribute('src'), shown: image.complete && image.naturalWidth > 0 && image.naturalHeight > 0})),
    formulas: Array.from(document.querySelectorAll('span.math'), span => {
      const shownError = span.querySelector('.katex-error');
      const annotation = span.querySelector('annotation[encoding="application/x-tex"]');
      const tex = shownError ? shownError.textContent : annotation ? annotation.textContent : span.textContent;
      let error = shownError ? shownError.getAttribute('title') : null;
      if (loaded && error === null) {
        try { katex.renderToString(tex, {displayMode: span.classList.contains('display'), throwOnError: true, macros}); }
        catch (e) { error = e.name ? `${e.name}: ${e.message}` : String(e); }
      }
      return {tex, error, rendered: shownError === null && span.querySelector('.katex') !== null};
    }),
    overflowing: Array.from(document.querySelectorAll('pre, .katex-display'), element => {
      // content wider than its box must scroll in a box that shows its scroll bar and fits the page
      const pageWidth = document.documentElement.clientWidth;
      const wide = e => e.scrollWidth > e.clientWidth + 1;
      const beyondPage = e => e.getBoundingClientRect().right > pageWidth + 1;
      const scrollBarShows = e => {
        const style = getComputedStyle(e);
        return ['auto', 'scroll'].includes(style.overflowX) && e.offsetHeight - e.clientHeight
          - parseFloat(style.borderTopWidth) - parseFloat(style.borderBottomWidth) > 0;
      };
      let problem = null;
      if (!wide(element)) { if (beyondPage(element)) problem = 'it is wider than the page'; }
      else {
        let box = element;
        while (box && box !== document.body && !(wide(box) && scrollBarShows(box))) box = box.parentElement;
        if (!box || box === document.body)
          problem = `${element.scrollWidth - element.clientWidth} px wider than its box, and no scroll bar shows`;
        else if (beyondPage(box)) problem = 'it scrolls in a box wider than the page';
      }
      const kind = element.tagName === 'PRE' ? 'a code block' : 'a displayed formula';
      const annotation = element.querySelector('annotation[encoding="application/x-tex"]');
      const text = annotation ? annotation.textContent.replace(/\s+/g, ' ').trim()
                              : element.textContent.trim().split('\n')[0];
      return problem && {kind, problem, text: text.slice(0, 80)};
    }).filter(found => found),
    rawMarkdown: (() => {
      // text outside code and maths that still holds markdown link attributes
      const found = [], walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        if (node.parentElement.closest('pre, code, .math, .katex, script, style')) continue;
        for (const match of node.textContent.matchAll(/\{[^{}]*\b(?:target|style)=[^{}]*\}/g)) found.push(match[0]);
      }
      return found;
    })(),
  };
}"""


@pytest.fixture(scope='session')
def katex_dist() -> Path:
    "The dist/ folder of the katex npm package: HVAE_KATEX, or npm's install into a cache folder (once)."
    if os.environ.get('HVAE_KATEX'): dist = Path(os.environ['HVAE_KATEX'])
    else:
        cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'hvae_nb' / f'katex-{KATEX_VERSION}'
        dist = cache / 'node_modules' / 'katex' / 'dist'
        if not (dist / 'katex.min.js').is_file():
            npm = shutil.which('npm')
            if npm is None: pytest.fail("npm is not installed: the browser check installs KaTeX with it (apt-get install -y npm)")
            done = subprocess.run([npm, 'install', '--prefix', str(cache), '--no-audit', '--no-fund', f'katex@{KATEX_VERSION}'],
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"npm could not install katex@{KATEX_VERSION}:\n{done.stderr[-2000:]}"
    assert (dist / 'katex.min.js').is_file() and (dist / 'katex.min.css').is_file(), f"no KaTeX in {dist}"
    return dist


def chromium_path() -> str:
    candidates = [os.environ.get('HVAE_CHROMIUM')] + [shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome')]
    found = next((c for c in candidates if c), None)
    if found is None: pytest.fail("no Chromium: install Debian's (apt-get install -y chromium) or set HVAE_CHROMIUM to a Chrome/Chromium binary")
    return found


@pytest.fixture(scope='session')
def browser():
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.fail("the playwright package is missing: pip install -e '.[dev]' (or pip install playwright)")
    with sync_playwright() as playwright:
        # scroll bars drawn, as in a reader's browser: the overflow check needs them, and so do the screenshots
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                             ignore_default_args=['--hide-scrollbars'])
        yield browser
        browser.close()


def page_problems(browser, html: Path, katex_dist: Path, screenshots: Path | None = None) -> tuple[list[str], dict]:
    "What a reader would miss on the page: unloaded KaTeX, script errors, images that do not show, formulas in red."
    page = browser.new_page(viewport={'width': 1100, 'height': 900})
    script_errors, refused = [], []
    page.on('pageerror', lambda error: script_errors.append(str(error)))

    def answer(route):
        url = route.request.url
        if url.startswith(KATEX_URL):
            local = katex_dist / url[len(KATEX_URL):].split('?')[0].split('#')[0]
            route.fulfill(path=local) if local.is_file() else route.fulfill(status=404)
        elif url.startswith(('file:', 'data:')): route.continue_()
        else: refused.append(url); route.abort()

    page.route('**/*', answer)
    try:
        page.goto(html.as_uri(), wait_until='load', timeout=60_000)
        found = page.evaluate(PAGE_CHECK)
        if screenshots is not None:
            page.evaluate('document.fonts.ready.then(() => true)')
            page.screenshot(path=screenshots / f'{html.stem}_top.png')
            page.screenshot(path=screenshots / f'{html.stem}.png', full_page=True)
            if found['images']:
                page.locator('img').first.scroll_into_view_if_needed()
                page.screenshot(path=screenshots / f'{html.stem}_figure.png')
    finally:
        page.close()
    problems = []
    # pandoc writes the KaTeX scripts into pages that have maths only
    if found['formulas'] and not found['katex']: problems.append(f"KaTeX did not load (requests refused: {refused})")
    problems += [f"a script error: {e}" for e in script_errors]
    problems += [f"an image that does not show: {i['src']}" for i in found['images'] if not i['shown']]
    problems += [f"a formula KaTeX cannot render: `{f['tex']}`: {f['error'] or 'not rendered'}"
                 for f in found['formulas'] if f['error'] or not f['rendered']]
    problems += [f"{o['kind']} that does not fit the page ({o['problem']}): `{o['text']}`" for o in found['overflowing']]
    raw = Counter(' '.join(text.split()) for text in found['rawMarkdown'])
    problems += [f"markdown shown as text, {count} times: `{text}`" for text, count in raw.items()]
    return problems, {'images': len(found['images']), 'formulas': len(found['formulas']), 'refused': refused}


def screenshot_folder() -> Path | None:
    folder = os.environ.get('HVAE_SCREENSHOTS')
    if not folder: return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


@pytest.mark.parametrize('name', [p.name for p in chapter_paths()])
def test_page_in_browser(name, site, browser, katex_dist):
    html, _, _ = site.page(name)
    start = time.time()
    problems, counts = page_problems(browser, html, katex_dist, screenshot_folder())
    assert not problems, f"{name}: " + f"\n{name}: ".join(problems)
    print(f"{name}: {counts['images']} images, {counts['formulas']} formulas, {time.time() - start:.1f}s")


def test_browser_check_sees_broken_pages(tmp_path, pandoc, browser, katex_dist):
    """The check itself: a page with a figure, a good and a bad formula, a missing image, a long formula, a long
    code line, a link with attributes and such attributes escaped into text; then the same page styled as the
    pages were before nbs/styles.css kept them within the page, and with code that is clipped or hides its
    scroll bar."""
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    plt.figure(figsize=(1, 1)); plt.plot([0, 1]); plt.savefig(buffer, format='png'); plt.close()
    figure = dict(cell_type='code', execution_count=None, metadata={}, source='plt.plot([0, 1])',
                  outputs=[dict(output_type='display_data', metadata={},
                                data={'image/png': base64.b64encode(buffer.getvalue()).decode(), 'text/plain': '<Figure>'})])
    long_formula = ' + '.join(f'a_{{{i}}} b_{{{i}}}' for i in range(40))
    prose = dict(cell_type='markdown', metadata={}, source=(
        'Fine: $\\mathrm{KL}(q \\,\\|\\, p) = \\mathbb{E}_q[\\log q - \\log p]$ and\n$$\\sum_i x_i^2$$\n'
        'broken: $\\frac{1}{\\sigmaa}$ (shown with a red command), $\\left( x$ (shown as red source) and '
        '<img src="nowhere.png" alt="lost">\n\n'
        f'A long formula, $${long_formula}$$ a link read as Quarto reads it, '
        '[source](https://example.org){target="_blank" style="float:right"}, and one whose attributes are text: '
        '[source](https://example.org) \\{target="_blank"\\}'))
    code = dict(cell_type='code', execution_count=None, metadata={}, outputs=[],
                source='total = sum([' + ', '.join(f'value_{i}' for i in range(20)) + '])')
    notebook = dict(nbformat=4, nbformat_minor=5, metadata={}, cells=[prose, figure, code])
    path = tmp_path / 'broken.ipynb'
    path.write_text(json.dumps(notebook))
    html, _ = render(path, tmp_path, pandoc)
    assert len(re.findall(r'<a\s[^>]*target="_blank"', html)) == 1, "the link's attributes were not read"
    problems, counts = page_problems(browser, tmp_path / 'broken.html', katex_dist)
    assert counts['images'] == 2 and counts['formulas'] == 5
    assert len(problems) == 4, problems
    assert 'nowhere.png' in problems[0], problems
    assert all('ParseError' in p for p in problems[1:3]), problems
    assert '`\\frac{1}{\\sigmaa}`' in problems[1] and '`\\left( x`' in problems[2], problems
    assert problems[3] == 'markdown shown as text, 1 times: `{target="_blank"}`', problems

    def restyled(extra_rules: str | None) -> list[str]:
        "The problems of the page rendered with pandoc's own styles only (None), or the site's plus `extra_rules`."
        styles = None
        if extra_rules is not None:
            styles = tmp_path / 'styles.css'
            styles.write_text(STYLES.read_text() + extra_rules)
        render(path, tmp_path, pandoc, styles=styles)
        return [p for p in page_problems(browser, tmp_path / 'broken.html', katex_dist)[0] if p not in problems]

    found = restyled(None)
    assert len(found) == 1 and found[0].startswith('a displayed formula that does not fit the page ('), found
    assert 'no scroll bar shows' in found[0] and f'`{long_formula[:80]}`' in found[0], found
    unwrapped = 'pre > code.sourceCode { white-space: pre; } '
    for rule in ('div.sourceCode, pre { overflow: hidden; }', 'div.sourceCode { scrollbar-width: none; }'):
        found = restyled(unwrapped + rule)
        assert len(found) == 1 and found[0].startswith('a code block that does not fit the page (')
        assert 'no scroll bar shows' in found[0] and '`total = sum([value_0, value_1,' in found[0], found
    assert restyled(unwrapped) == [], "a code block that scrolls, with its scroll bar, fits the page"
