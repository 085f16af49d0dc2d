"""The import rules of the house (../shared/STYLE.md, 'The house as it grows'), read from the package's own imports.

Floors, lowest first; an import only ever points down:
1. the vocabulary and the parts (distributions, data, cells, spectral, residual_normal, iaf, and cli, the command lines'
   one spelling of options and one-line errors, which `python -m hvae_nb.data` uses too): they import only each other;
2. the interface and the loss (vae);
3. the models (every module defining a `HierarchicalVAE` subclass) and diagnostics: they never import the catalogue,
   the run directory, the trainer, evaluation, the benchmark, the converter or a command line;
4. the catalogue (presets): the only module that imports every model family;
5. runs and faces (configs, runs, cli, train, evaluate, bench, convert): the generic ones never import a concrete model.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'hvae_nb'
PARTS = {'distributions', 'data', 'cells', 'spectral', 'residual_normal', 'iaf', 'cli'}
GENERIC = {'train', 'evaluate', 'diagnostics', 'bench', 'configs', 'runs', 'cli'}
ABOVE_MODELS = {'presets', 'configs', 'runs', 'cli', 'train', 'evaluate', 'bench', 'convert'}


def module_imports(package: Path) -> tuple[dict[str, set[str]], set[str]]:
    "Per module of `package`, the package modules it imports; and the modules that define a model class."
    modules = {p.stem: p for p in package.glob('*.py') if p.stem not in ('__init__', '_modidx')}
    imports, models = {}, set()
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1: found |= {node.module.split('.')[0]} if node.module else {a.name for a in node.names}
                elif node.module and node.module.startswith(package.name + '.'): found.add(node.module.split('.')[1])
                elif node.module == package.name: found |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split('.')[1] for a in node.names if a.name.startswith(package.name + '.')}
            elif isinstance(node, ast.ClassDef) and name != 'vae':
                if any(getattr(b, 'id', getattr(b, 'attr', '')) == 'HierarchicalVAE' for b in node.bases): models.add(name)
        imports[name] = found & set(modules)
    return imports, models


def import_cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    "Every import circle found by a depth-first walk (each reported once from where it was first entered)."
    state, cycles = {}, []
    def visit(module, path):
        state[module] = 'open'
        for dependency in sorted(imports.get(module, ())):
            if state.get(dependency) == 'open': cycles.append(path[path.index(dependency):] + [dependency])
            elif dependency not in state: visit(dependency, path + [dependency])
        state[module] = 'done'
    for module in sorted(imports):
        if module not in state: visit(module, [module])
    return cycles


def test_the_checker_finds_what_it_looks_for(tmp_path):
    "The rules below can fail: a package with a circle and a generic module importing a model is caught."
    package = tmp_path / 'toy'
    package.mkdir()
    (package / 'vae.py').write_text('class HierarchicalVAE: pass\n')
    (package / 'model.py').write_text('from .vae import HierarchicalVAE\nfrom .presets import X\n'
                                      'class M(HierarchicalVAE): pass\n')
    (package / 'presets.py').write_text('from toy.model import M\nX = 1\n')
    (package / 'train.py').write_text('import toy.model\n')
    imports, models = module_imports(package)
    assert models == {'model'} and imports['train'] == {'model'}
    assert import_cycles(imports) == [['model', 'presets', 'model']]


IMPORTS, MODELS = module_imports(PACKAGE)


def test_the_package_has_models_and_parts_to_check():
    assert {'vae', 'lvae', 'presets', 'train'} <= set(IMPORTS) and 'lvae' in MODELS


def test_no_import_circles():
    assert import_cycles(IMPORTS) == []


@pytest.mark.parametrize('part', sorted(PARTS & set(IMPORTS)))
def test_parts_depend_only_on_the_vocabulary(part):
    assert IMPORTS[part] <= PARTS, f"{part} imports {sorted(IMPORTS[part] - PARTS)}"


def test_models_sit_below_the_catalogue_and_the_faces():
    for model in sorted(MODELS | {'vae', 'diagnostics'}):
        assert not IMPORTS[model] & ABOVE_MODELS, f"{model} imports {sorted(IMPORTS[model] & ABOVE_MODELS)}"


def test_generic_modules_never_import_a_concrete_model():
    for module in sorted(GENERIC & set(IMPORTS)):
        assert not IMPORTS[module] & MODELS, f"{module} imports the model module(s) {sorted(IMPORTS[module] & MODELS)}"


def test_the_catalogue_is_the_only_module_that_knows_every_family():
    assert [module for module in sorted(IMPORTS) if MODELS <= IMPORTS[module]] == ['presets']


def test_kl_warmup_lives_with_the_loss():
    import hvae_nb.lvae, hvae_nb.train, hvae_nb.vae
    assert hvae_nb.train.kl_warmup is hvae_nb.vae.kl_warmup and not hasattr(hvae_nb.lvae, 'kl_warmup')
