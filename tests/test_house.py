"""The import rules of the house (../shared/STYLE.md, 'The house as it grows'), read from the package's own imports.

Floors, lowest first; an import only ever points down (or along its own floor, without a circle):
1. the vocabulary and the parts (distributions, data, cells, spectral, residual_normal, iaf), the command lines' one
   spelling of options and one-line errors (cli), and the configuration (configs: errors and checks, ModelConfig,
   TrainConfig, Preset, the family registry, overrides, JSON);
2. the interface and the loss (vae);
3. the run (runs: one `Run` owns a run directory; it builds models only through `preset.model.build()`);
4. the models (every module defining a `HierarchicalVAE` subclass), diagnostics and FID;
5. the catalogue (presets): the only module that imports every model family;
6. the faces (train, evaluate, bench, convert): the generic ones never import a concrete model.
"""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'hvae_nb'
PARTS = {'distributions', 'data', 'cells', 'spectral', 'residual_normal', 'iaf', 'cli', 'configs'}
FLOORS = {**{m: 1 for m in PARTS}, 'vae': 2, 'runs': 3, 'lvae': 4, 'nvae': 4, 'vdvae': 4, 'autoregressive': 4,
          'diagnostics': 4, 'fid': 4, 'presets': 5, 'train': 6, 'evaluate': 6, 'bench': 6, 'convert': 6}
GENERIC = {'train', 'evaluate', 'diagnostics', 'fid', 'bench', 'configs', 'runs', 'cli'}
ABOVE_MODELS = {'presets', 'train', 'evaluate', 'bench', 'convert'}


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


def test_every_module_has_a_floor_and_imports_only_down():
    assert set(IMPORTS) == set(FLOORS), f"modules without a floor: {sorted(set(IMPORTS) - set(FLOORS))}"
    upward = [f"{m} (floor {FLOORS[m]}) imports {d} (floor {FLOORS[d]})"
              for m, deps in sorted(IMPORTS.items()) for d in sorted(deps) if FLOORS[d] > FLOORS[m]]
    assert upward == []


def test_the_floor_checker_finds_an_upward_import(tmp_path):
    package = tmp_path / 'toy'
    package.mkdir()
    (package / 'configs.py').write_text('from .runs import Run\n')
    (package / 'runs.py').write_text('X = 1\n')
    imports, _ = module_imports(package)
    assert [d for m, deps in imports.items() for d in deps if FLOORS[d] > FLOORS[m]] == ['runs']


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


# The floors at run time: a preset handed to train() and a run directory handed to the evaluator go down the floors.
# The only calls from a lower floor up are a family's own methods reached through its object (a configuration's
# validate and build, its model's constructor): the registry's dispatch, which is how the lower floors stay
# ignorant of the families. Anything else going up (the run asking the catalogue, a configuration calling the
# trainer) fails here, naming the call.
DISPATCH = {'validate', 'build', '__init__', '__post_init__'}


def calls_up_a_floor(work, stop_at: set[str]) -> list[str]:
    "Cross-module calls inside hvae_nb that go up a floor, from `work()` until a function in `stop_at` starts."
    found, tracing = [], [True]

    def watch(frame, event, arg):
        if not tracing[0] or event != 'call': return
        callee = frame.f_globals.get('__name__', '')
        if not callee.startswith('hvae_nb.'): return
        if frame.f_code.co_name in stop_at:
            tracing[0] = False
            return
        caller = frame.f_back.f_globals.get('__name__', '') if frame.f_back else ''
        if not caller.startswith('hvae_nb.'): return
        low, high = caller.split('.')[1], callee.split('.')[1]
        if FLOORS.get(high, 0) > FLOORS.get(low, 0):
            dispatch = high in MODELS and frame.f_code.co_name in DISPATCH
            if not dispatch: found.append(f"{low}.{frame.f_back.f_code.co_name} -> {high}.{frame.f_code.co_name}")

    sys.setprofile(watch)
    try: work()
    finally: sys.setprofile(None)
    return found


def test_a_preset_and_a_run_directory_go_down_the_floors(tmp_path):
    from dataclasses import replace
    from hvae_nb.evaluate import evaluate_run
    from hvae_nb.presets import get_preset
    from hvae_nb.train import train
    preset = get_preset('lvae_digits')
    preset = replace(preset, train=replace(preset.train, max_steps=2, kl_warmup_steps=0, eval_every=10 ** 6,
                                           save_every=10 ** 6, final_eval_samples=2, eval_examples=20))
    assert calls_up_a_floor(lambda: train(preset, out=tmp_path / 'traced', progress=False), {'train_step'}) == []
    train(preset, out=tmp_path / 'run', progress=False)
    evaluation = lambda: evaluate_run(tmp_path / 'run', k=2, max_examples=20, figures=False, progress=False)
    assert calls_up_a_floor(evaluation, {'score_images'}) == []


def test_the_floor_watch_sees_a_call_up():
    # a function of the catalogue called from the vocabulary's floor: what the watch must report
    import types
    low = types.ModuleType('hvae_nb.configs')
    exec("def ask(f): return f()", low.__dict__)
    high = types.ModuleType('hvae_nb.presets')
    exec("def answer(): return 1", high.__dict__)
    assert calls_up_a_floor(lambda: low.ask(high.answer), set()) == ['configs.ask -> presets.answer']
