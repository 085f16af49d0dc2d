"""JupyterLab's "Run All" leaves every stored long-run result in place.

A chapter's long cells (`#| slow`) run their long body only with HVAE_SLOW=1; otherwise they show the stored result
of the long run. A reader who opens a chapter and presses "Run All" (HVAE_SLOW unset) runs those cells too, so each
must then show its stored result again -- not replace the figures of the long run with a message. This test runs
every chapter that has long cells the way "Run All" does, in a fresh kernel (nbclient, the environment of
tools/execute_chapters.py: nbs/ as working directory, HVAE_SLOW and MPLBACKEND unset, so figures are inline PNGs),
and fails when a long cell ends with fewer images than the chapter stores for it, or raises.

It stays cheap by running only what the long cells need: their stored-result branch (the `else` of their
`if os.environ.get('HVAE_SLOW') == '1'`, which must be cheap by construction) and, before them, the cells that define
the names those branches use, found by reading the code (and again for the names those cells use). A name that no
earlier cell defines raises in the kernel as it would in "Run All", and the failure says so.
"""
import ast, builtins, json, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
sys.path.insert(0, str(ROOT / 'tools'))
from execute_chapters import chapter_paths, directives, kernel_environment, skip_flags, source  # noqa: E402

KNOWN_NAMES = set(dir(builtins)) | {'display', 'get_ipython', 'In', 'Out', 'exit', 'quit'}


def is_long(cell: dict) -> bool:
    return cell['cell_type'] == 'code' and bool(skip_flags(ROOT) & directives(cell).keys())


def never_run(cell: dict) -> bool:
    "Cells that neither Run All nor the chapter's execution runs as code: markdown, `eval: false`, nbdev_export()."
    return (cell['cell_type'] != 'code' or directives(cell).get('eval', '').lower() == 'false'
            or 'nbdev_export(' in source(cell))


def python_of(cell: dict) -> ast.Module:
    "The cell's code without IPython's `%magic` and `!shell` lines."
    lines = [l for l in source(cell).splitlines() if not l.lstrip().startswith(('%', '!'))]
    return ast.parse('\n'.join(lines))


def waits_for_hvae_slow(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.If) and 'HVAE_SLOW' in ast.unparse(statement.test)


def as_run_all_runs_it(cell: dict) -> list[ast.stmt]:
    "The statements Run All runs: in a long cell, the HVAE_SLOW test and its `else` branch."
    body = []
    for statement in python_of(cell).body:
        long = is_long(cell) and waits_for_hvae_slow(statement)
        body += [ast.Expr(statement.test)] + statement.orelse if long else [statement]
    return body


class Scope(ast.NodeVisitor):
    "Names a block of module-level statements binds and names it reads (nested scopes' reads included)."
    def __init__(self):
        self.bound, self.read = set(), set()

    def visit_Name(self, node):
        (self.read if isinstance(node.ctx, ast.Load) else self.bound).add(node.id)

    def visit_Import(self, node):
        self.bound |= {(a.asname or a.name).split('.')[0] for a in node.names}

    def visit_ImportFrom(self, node):
        self.bound |= {a.asname or a.name for a in node.names}

    def visit_FunctionDef(self, node):
        "Decorators, defaults and annotations are read where the function is defined; its body when it is called."
        self.bound.add(node.name)
        arguments = node.args
        every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
        every += [a for a in (arguments.vararg, arguments.kwarg) if a]
        evaluated = node.decorator_list + arguments.defaults + [d for d in arguments.kw_defaults if d]
        evaluated += [a.annotation for a in every if a.annotation] + ([node.returns] if node.returns else [])
        for child in evaluated: self.visit(child)
        inner = Scope()
        for child in node.body: inner.visit(child)
        self.read |= inner.read - inner.bound - {a.arg for a in every}

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.bound.add(node.name)
        inner = Scope()
        for child in node.bases + node.keywords + node.decorator_list + node.body: inner.visit(child)
        self.read |= inner.read - inner.bound

    def visit_Lambda(self, node):
        inner = Scope()
        inner.visit(node.body)
        for child in node.args.defaults: inner.visit(child)
        self.read |= inner.read - inner.bound - {a.arg for a in node.args.args + node.args.kwonlyargs}

    def comprehension(self, node):
        inner = Scope()
        for child in ast.iter_child_nodes(node): inner.visit(child)
        self.read |= inner.read - inner.bound

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = comprehension


def names_of(statements: list[ast.stmt]) -> tuple[set[str], set[str]]:
    "(bound, free): what the statements define at module level, and what they read that they do not define."
    scope = Scope()
    for statement in statements: scope.visit(statement)
    return scope.bound, scope.read - scope.bound - KNOWN_NAMES


def cells_to_run(notebook: dict) -> tuple[list[int], dict[str, int]]:
    """The indices of the long cells and of the earlier cells that define what they read, in order; and the names
    no earlier cell defines, with the cell that reads them."""
    cells = notebook['cells']
    code = {i: as_run_all_runs_it(c) for i, c in enumerate(cells) if not never_run(c)}
    names = {i: names_of(statements) for i, statements in code.items()}
    wanted = [(i, name) for i in code if is_long(cells[i]) for name in names[i][1]]
    chosen, undefined = {i for i in code if is_long(cells[i])}, {}
    while wanted:
        reader, name = wanted.pop()
        definers = [i for i in code if i < reader and name in names[i][0]]
        if not definers: undefined.setdefault(name, reader); continue
        if definers[-1] not in chosen:
            chosen.add(definers[-1])
            wanted += [(definers[-1], n) for n in names[definers[-1]][1]]
        # a name bound by several cells (a counter, a figure) keeps the binding "Run All" would see
    return sorted(chosen), undefined


def image_count(cell: dict) -> int:
    return sum(any(k.startswith('image/') for k in o.get('data', {})) for o in cell.get('outputs', []))


def chapters_with_long_cells() -> list[str]:
    return [p.name for p in chapter_paths(NBS) if any(is_long(c) for c in json.loads(p.read_text())['cells'])]


@pytest.mark.parametrize('name', chapters_with_long_cells())
def test_run_all_keeps_long_run_results(name):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = NBS / name
    notebook = nbformat.read(path, as_version=4)
    stored = {i: image_count(c) for i, c in enumerate(notebook.cells) if is_long(c)}
    chosen, undefined = cells_to_run(json.loads(path.read_text()))
    client = NotebookClient(notebook, timeout=300, kernel_name='python3', allow_errors=False,
                            resources={'metadata': {'path': str(NBS)}})
    start, failure = time.time(), None
    with client.setup_kernel(env=kernel_environment(slow=False)):
        for index in chosen:
            try: client.execute_cell(notebook.cells[index], index)
            except CellExecutionError as error:
                reason = str(error).strip().splitlines()[-1][:300]
                failure = f"{name}: cell {index} raised in a plain Run All: {reason}"
                if index in stored: failure += " (a long cell's stored-result branch must run on its own)"
                break
    hint = ''.join(f"\n  `{n}` (read by cell {i}) is defined by no earlier cell" for n, i in undefined.items())
    assert failure is None, failure + hint
    lost = [f"cell {i}: {image_count(notebook.cells[i])} of its {count} stored images"
            for i, count in stored.items() if image_count(notebook.cells[i]) < count]
    assert not lost, (f"{name}: a plain Run All (HVAE_SLOW unset) replaces stored results of long runs, leaving "
                      + '; '.join(lost) + ". Show the stored result in the cell's else branch (a figure saved "
                      "under nbs/images/, displayed with IPython.display.Image), as the text of the long run is.")
    print(f"{name}: cells {chosen} in {time.time() - start:.0f} s; stored images per long cell {stored}")


def test_the_reading_finds_what_a_long_cell_needs():
    "The check itself, on a small chapter: which cells a long cell's stored-result branch needs."
    code = lambda text: dict(cell_type='code', execution_count=None, metadata={}, outputs=[], source=text)
    cells = [dict(cell_type='markdown', metadata={}, source='# T'),
             code('import os\nfrom pathlib import Path'),                        # 1: os, Path
             code('def stored(name):\n    return Path("images") / name'),          # 2: stored, reads Path
             code('model = train_for_an_hour()'),                                 # 3: expensive, unneeded
             code('#| slow\nif os.environ.get("HVAE_SLOW") == "1":\n    print(model)\n'
                  'else:\n    print(stored("run.png"), [n for n in range(2)], helper)'),
             code('#| eval: false\nhelper = 1')]                                 # 5: never run
    chosen, undefined = cells_to_run(dict(cells=cells, metadata={}))
    assert chosen == [1, 2, 4] and undefined == {'helper': 4}, (chosen, undefined)
