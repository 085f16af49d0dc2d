"""Execute chapters in place, so the committed notebooks (and the site built from them) show what they compute.

    python tools/execute_chapters.py                        # every chapter, in reading order
    python tools/execute_chapters.py nbs/03_lvae.ipynb      # one chapter
    python tools/execute_chapters.py --stale                # only those whose code (or hvae_nb code) changed
    python tools/execute_chapters.py --slow nbs/02_vae.ipynb  # also the long `#| slow` cells, with HVAE_SLOW=1

Each chapter runs top to bottom in a fresh Jupyter kernel (nbclient, the executor behind `jupyter nbconvert
--execute`), in `nbs/` as working directory, with `hvae_nb` imported from this checkout, one thread
(OMP_NUM_THREADS=1), HVAE_SLOW unset and MPLBACKEND unset, so that matplotlib draws inline PNG figures.

The cells nbdev_test skips are skipped here too and keep their stored outputs: cells flagged with one of
settings.ini's `tst_flags` (`#| slow`: the long training runs, whose stored output is the result of the run made
with `--slow`), `#| eval: false` cells and `nbdev_export()` calls.

After a chapter ran without error, the script records in the notebook's metadata (settings.ini lists `hvae_nb` in
`allowed_metadata_keys`, so nbdev_clean keeps it)
- `metadata["hvae_nb"]["code_sha256"]`: the SHA-256 of its code cells' sources;
- `metadata["hvae_nb"]["module_sha256"]`: for every module of the package the chapter runs -- those its cells name
  (`from hvae_nb.vae import ...`, `from hvae_nb import data`, `python -m hvae_nb.train`), then those these import,
  and so on, `hvae_nb/__init__.py` included -- a SHA-256 of the module's code (its syntax tree without comments and
  docstrings, so that rewording a docstring leaves the chapters alone, and any change of what runs does not),
and runs `nbdev_clean` on it, which also drops execution counts, timings and the kernel's language_info.
tests/test_executed.py compares both with the chapter's current code and the package's current modules, so a
chapter whose code, or the code of a module it runs, changed after it was executed fails the tests, naming the
module, until it is executed again. A chapter that fails is not written; the script goes on with the next one and
exits with status 1.
"""
import argparse, ast, configparser, functools, hashlib, json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
METADATA_KEY = 'hvae_nb'
KERNELSPEC = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}


def chapter_paths(nbs: Path = NBS) -> list[Path]:
    "The chapters in reading order (sorted by name: the numbered chapters, then index.ipynb); nbdev skips `_*`, `.*`."
    return sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.')))


def source(cell: dict) -> str:
    text = cell.get('source', '')
    return ''.join(text) if isinstance(text, list) else text


def code_sha256(notebook: dict) -> str:
    "The hash of the sources of every code cell, skipped cells included (editing a `#| slow` cell counts too)."
    sources = [source(c) for c in notebook['cells'] if c['cell_type'] == 'code']
    return hashlib.sha256(json.dumps(sources, ensure_ascii=False).encode()).hexdigest()


def recorded_sha256(notebook: dict) -> str | None:
    return notebook.get('metadata', {}).get(METADATA_KEY, {}).get('code_sha256')


# ---- the package code a chapter runs ----------------------------------------------------------------------------

PACKAGE = 'hvae_nb'
# `hvae_nb.name` anywhere in code: an import, an attribute, `python -m hvae_nb.train` in a command line
DOTTED = re.compile(rf'\b{PACKAGE}\.(\w+)')


def named_modules(code: str, package: Path, relative_to: str | None = None) -> set[str]:
    """The package's modules (file names, e.g. 'vae.py') that `code` imports or names. `relative_to`: the module
    `code` is the source of, for its relative imports (`from .vae import ...`, as nbdev writes them)."""
    exists = lambda name: (package / f'{name}.py').is_file()
    found = {f'{m}.py' for m in DOTTED.findall(code) if exists(m)}
    try: tree = ast.parse(code)
    except SyntaxError: return found      # a cell with IPython syntax: what the names above found
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {f"{a.name.split('.')[1]}.py" for a in node.names
                      if a.name.startswith(f'{PACKAGE}.') and exists(a.name.split('.')[1])}
        elif isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or '').split('.')[0] == PACKAGE
            if not (absolute or (node.level == 1 and relative_to is not None)): continue
            parts = (node.module or '').split('.')[1 if absolute else 0:]
            parts = [p for p in parts if p]
            if parts: found |= {f'{parts[0]}.py'} if exists(parts[0]) else set()
            else: found |= {f'{a.name}.py' for a in node.names if exists(a.name)}   # from hvae_nb import data
    return found


def module_code(path: Path) -> str:
    "What a module runs: its syntax tree without comments (which the tree drops) and docstrings."
    stat = path.stat()
    return parsed_code(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def parsed_code(path: str, modified: int, size: int) -> str:
    "module_code, once per version of the file (the test asks for every chapter's modules)."
    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        body = getattr(node, 'body', None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def chapter_modules(notebook: dict, package: Path = ROOT / PACKAGE) -> list[str]:
    "The package's modules a chapter runs (as 'hvae_nb/vae.py'): those its code cells name, and all they import."
    cells = '\n'.join(source(c) for c in notebook['cells'] if c['cell_type'] == 'code')
    lines = [l for l in cells.splitlines() if not l.lstrip().startswith(('%', '!'))]   # no IPython syntax
    todo, seen = named_modules('\n'.join(lines), package), set()
    while todo:
        name = todo.pop()
        if name in seen: continue
        seen.add(name)
        todo |= named_modules((package / name).read_text(), package, relative_to=name)
    if seen and (package / '__init__.py').is_file(): seen.add('__init__.py')     # runs at any import
    return sorted(f'{package.name}/{name}' for name in seen)


def module_sha256(notebook: dict, package: Path = ROOT / PACKAGE) -> dict[str, str]:
    "{'hvae_nb/vae.py': SHA-256 of its code, ...} for every module the chapter runs."
    return {name: hashlib.sha256(module_code(package.parent / name).encode()).hexdigest()
            for name in chapter_modules(notebook, package)}


def stale_reasons(notebook: dict, package: Path = ROOT / PACKAGE) -> list[str]:
    "Why a chapter's stored outputs may not be what its code computes now (empty: they are its code's)."
    record = notebook.get('metadata', {}).get(METADATA_KEY, {})
    if 'code_sha256' not in record: return ['it was never executed by tools/execute_chapters.py']
    reasons = [] if record['code_sha256'] == code_sha256(notebook) else ['its code changed since it was executed']
    current = module_sha256(notebook, package)
    if 'module_sha256' not in record:
        if not current: return reasons        # it runs no module of the package: nothing to record
        return reasons + ['it was executed before the script recorded the hvae_nb modules a chapter runs']
    recorded = record['module_sha256']
    changed = [m for m in current if m in recorded and recorded[m] != current[m]]
    added, dropped = [m for m in current if m not in recorded], [m for m in recorded if m not in current]
    if changed: reasons.append(f"the code of {', '.join(changed)}, which it runs, changed since it was executed")
    if added: reasons.append(f"it now runs {', '.join(added)}, which it did not when it was executed")
    if dropped: reasons.append(f"it no longer runs {', '.join(dropped)}")
    return reasons


def skip_flags(root: Path = ROOT) -> set[str]:
    "settings.ini's `tst_flags`: the cell flags nbdev_test skips unless asked (`slow`)."
    config = configparser.ConfigParser()
    config.read(root / 'settings.ini')
    return set(config['DEFAULT'].get('tst_flags', '').split())


def directives(cell: dict) -> dict[str, str]:
    "The `#| key: value` lines at the top of a cell, as {key: value} (a bare flag such as `#| slow` maps to '')."
    found = {}
    for line in source(cell).splitlines():
        if not line.startswith('#|'): break
        key, _, value = line[2:].strip().partition(':')
        parts = key.split()
        if parts: found[parts[0]] = value.strip() if value else ' '.join(parts[1:])
    return found


def is_skipped(cell: dict, flags: set[str]) -> bool:
    "Whether nbdev_test (and so this script) leaves the cell alone: a test flag, `eval: false` or `nbdev_export()`."
    if cell['cell_type'] != 'code': return True
    options = directives(cell)
    return bool(flags & options.keys()) or options.get('eval', '').lower() == 'false' or 'nbdev_export(' in source(cell)


def kernel_environment(slow: bool) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ('HVAE_SLOW', 'MPLBACKEND')}
    environment['OMP_NUM_THREADS'] = '1'
    # the checkout's hvae_nb, not whatever an editable install points at
    environment['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    if slow: environment['HVAE_SLOW'] = '1'
    return environment


def nbdev_clean(path: Path) -> None:
    "nbdev's own cleaning, as `nbdev_clean --fname path` run from the repository root (it reads settings.ini)."
    done = subprocess.run([sys.executable, '-c', 'from nbdev.clean import nbdev_clean; nbdev_clean()', '--fname', str(path)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0 or 'Failed to clean' in done.stderr:
        raise RuntimeError(f"nbdev_clean failed on {path.name}:\n{done.stderr}")


def execute(path: Path, timeout: int, slow: bool) -> None:
    "Run the chapter in a fresh kernel, record its code hash, write it and clean it."
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    flags = set() if slow else skip_flags()
    client = NotebookClient(notebook, timeout=timeout, kernel_name='python3', allow_errors=False,
                            record_timing=False, store_widget_state=False,
                            resources={'metadata': {'path': str(path.parent)}})
    start, timings = time.time(), []
    with client.setup_kernel(env=kernel_environment(slow)):
        for index, cell in enumerate(notebook.cells):
            if is_skipped(cell, flags): continue
            cell_start = time.time()
            client.execute_cell(cell, index)
            timings.append((time.time() - cell_start, index))
    notebook.metadata['kernelspec'] = KERNELSPEC
    notebook.metadata[METADATA_KEY] = {'code_sha256': code_sha256(notebook), 'module_sha256': module_sha256(notebook)}
    nbformat.write(notebook, path)
    nbdev_clean(path)

    written = json.loads(path.read_text())
    if stale_reasons(written):
        raise RuntimeError(f"nbdev_clean dropped metadata['{METADATA_KEY}'] of {path.name}: "
                           f"list `{METADATA_KEY}` in settings.ini's allowed_metadata_keys")
    outputs = [o for c in written['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]
    figures = sum('image/png' in o.get('data', {}) for o in outputs)
    other_images = sum(any(k.startswith('image/') and k != 'image/png' for k in o.get('data', {})) for o in outputs)
    slowest = ', '.join(f"cell {i} {t:.1f}s" for t, i in sorted(timings, reverse=True)[:3])
    print(f"{path.name}: {time.time() - start:.1f}s, {len(timings)} cells run, {len(outputs)} outputs, "
          f"{figures} PNG figures" + (f", {other_images} images not PNG" if other_images else '')
          + (f" (slowest: {slowest})" if timings else ''), flush=True)


def main(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('chapters', nargs='*', type=Path, help='notebooks to execute (default: every chapter)')
    parser.add_argument('--stale', action='store_true',
                        help='only chapters whose code, or the code of an hvae_nb module they run, changed since '
                             'they were executed')
    parser.add_argument('--slow', action='store_true', help='also run the `#| slow` cells, with HVAE_SLOW=1 (long)')
    parser.add_argument('--timeout', type=int, default=900, help='seconds allowed to one cell (default: 900)')
    options = parser.parse_args(arguments)
    chapters = [p.resolve() for p in options.chapters] or chapter_paths()
    if options.stale:
        chapters = [p for p in chapters if stale_reasons(json.loads(p.read_text()))]
        if not chapters: print('no chapter changed since it was executed')
    failed = []
    for path in chapters:
        flags = set() if options.slow else skip_flags()
        if all(is_skipped(c, flags) for c in json.loads(path.read_text())['cells']):
            print(f"{path.name}: no code to run", flush=True)
            continue
        try: execute(path, options.timeout, options.slow)
        except Exception as error:  # report the chapter and go on with the others
            failed.append(path.name)
            print(f"{path.name}: FAILED, not written\n{error}", file=sys.stderr, flush=True)
    if failed: print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
