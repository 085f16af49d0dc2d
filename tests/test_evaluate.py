"""`python -m hvae_nb.evaluate` on the tiny run the test files share (tests/shared_runs.py: 200 steps of vae_digits
with EMA on), read where it lies or copied where a test writes.

The command line is run as a user runs it (a subprocess); the few checks that need the library's pieces call them
directly. Bad input must give exit status 2 and one line on stderr, and must not write an eval.json."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # test the working tree even when the package is not pip-installed

from hvae_nb.evaluate import FIGURE_NAMES, evaluate_run, evaluation_images, main  # noqa: E402
from hvae_nb.runs import Run  # noqa: E402
from hvae_nb.data import load_data, random_subset  # noqa: E402
from hvae_nb.vae import dataset_nll  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.configs import apply_overrides  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ENVIRONMENT = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
               'MPLBACKEND': 'Agg'}


def evaluate_command(*args) -> list:
    return [sys.executable, '-m', 'hvae_nb.evaluate', *map(str, args), '--no-progress']


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(evaluate_command(*args), capture_output=True, text=True, env=ENVIRONMENT, timeout=300)


def test_eval_json_and_figures(tiny_run, tmp_path):
    # a copy: the evaluation writes eval.json and figures/ into the run it scores
    run_dir = shutil.copytree(tiny_run, tmp_path / 'run', ignore=shutil.ignore_patterns('checkpoints'))
    done = run(run_dir, '--k', '20', '--max-examples', '60', '--batch-size', '25')
    assert done.returncode == 0, done.stderr
    result = json.loads((run_dir / 'eval.json').read_text())['test_k20_60of297_batch25']
    # one short line, with the number and where the rest was written
    assert len(done.stdout.strip().splitlines()) == 1 and f"{result['nll_nats']:.2f} nats" in done.stdout
    assert str(run_dir / 'eval.json') in done.stdout
    assert (result['preset'], result['dataset'], result['split'], result['k']) == ('vae_digits', 'digits', 'test', 20)
    assert (result['num_examples'], result['split_size'], result['subset_seed']) == (60, 297, 0)
    assert result['weights'] == dict(file='model.safetensors', kind='ema', ema_decay=0.9,
                                     description='exponential moving average of the weights (decay 0.9)')
    # the numbers, nats per image of 64 binary pixels: far below the same network untrained (about the coin
    # flips' 64 ln 2 = 44 nats), on the same images with the same k; and a negative ELBO below independent
    # pixels with the training frequencies, which a model whose latents carry nothing cannot beat
    images = evaluation_images(get_preset('vae_digits'), 'test', 60, seed=0)[0][:]   # the 60 images, as float
    torch.manual_seed(0)
    untrained = dataset_nll(get_preset('vae_digits').model.build(), images, num_samples=20)['nll_nats']
    frequencies = load_data('digits').train[:].mean(0).clamp(1e-4, 1 - 1e-4)
    independent_pixels = -(images * frequencies.log() + (1 - images) * (1 - frequencies).log()).sum((1, 2, 3))
    assert result['nll_nats'] < untrained - 10, (result['nll_nats'], untrained)
    assert result['neg_elbo_nats'] < independent_pixels.mean() - 1, (result['neg_elbo_nats'], independent_pixels.mean())
    assert 0 < result['nll_standard_error_nats'] < 2
    assert result['nll_bits_per_dim'] == pytest.approx(result['nll_nats'] / (64 * 0.6931471805599453))
    assert result['nll_nats'] < result['neg_elbo_nats'] + 1.0       # a k = 20 bound is no looser than the ELBO
    assert result['neg_elbo_nats'] == pytest.approx(result['reconstruction_nats'] + result['kl_nats'])
    assert len(result['kl_per_group_nats']) == 1 and result['kl_nats'] == pytest.approx(sum(result['kl_per_group_nats']))
    active = result['active_units']
    assert active['group_sizes'] == [8] and active['total'] == sum(active['per_group']) and active['threshold'] == 0.01
    # the count, recomputed from the posterior means of the weights on disk
    model = Run.open(run_dir).model()
    with torch.no_grad(): means = model.posterior_means(images)[0]
    assert active['per_group'] == [int((means.var(0) > 0.01).sum())]
    # with the prior N(0, I) the KL of a unit is at least mu^2 / 2: a lower bound from the same means
    assert result['kl_per_group_nats'][0] >= 0.5 * means.var(0, unbiased=False).sum()
    # the pictures
    assert sorted(result['figures']) == sorted(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        data = (run_dir / 'figures' / name).read_bytes()
        assert data.startswith(b'\x89PNG') and len(data) > 2000, name


def test_same_seed_same_numbers_and_train_split(tiny_run, tmp_path):
    # a copy, so that this test's eval.json does not race with the other test's
    run_dir = tmp_path / 'run'
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns('checkpoints', 'figures', 'eval.json'))
    first = evaluate_run(run_dir, k=5, max_examples=40, figures=False, progress=False)
    again = evaluate_run(run_dir, k=5, max_examples=40, figures=False, progress=False)
    other = evaluate_run(run_dir, k=5, max_examples=40, seed=1, figures=False, progress=False)
    assert first['nll_nats'] == again['nll_nats'] and first['nll_nats'] != other['nll_nats']
    # under torch.compile (--compile): for a one-group model the same draws, so the same estimate
    compiled = evaluate_run(run_dir, k=5, max_examples=40, figures=False, progress=False, compiled=True)
    assert compiled['compiled'] and not first['compiled']
    assert abs(compiled['nll_nats'] - first['nll_nats']) < 1e-4, (compiled['nll_nats'], first['nll_nats'])
    train = evaluate_run(run_dir, k=5, split='train', max_examples=30, figures=False, progress=False)
    assert (train['split'], train['num_examples'], train['split_size']) == ('train', 30, 1500)
    images, _ = evaluation_images(get_preset('vae_digits'), 'train', 30, seed=0)
    assert set(images[:].unique().tolist()) <= {0.0, 1.0}     # grey training digits are binarised, like the test set


def test_subset_is_random_not_a_prefix():
    sorted_by_label = torch.arange(1000.).view(-1, 1, 1, 1)
    chosen = random_subset(sorted_by_label, 100, seed=0)
    assert torch.equal(chosen, random_subset(sorted_by_label, 100, seed=0))
    assert not torch.equal(chosen, sorted_by_label[:100]) and chosen.unique().numel() == 100 and chosen.max() > 900


def corrupt_copies(tiny_run: Path, base: Path) -> dict[str, Path]:
    "Run directories broken in one way each."
    def copy(name):
        target = base / name
        shutil.copytree(tiny_run, target, ignore=shutil.ignore_patterns('checkpoints', 'figures', 'eval.json'))
        return target
    broken = dict(empty=base / 'empty', missing=base / 'missing')
    broken['empty'].mkdir()
    broken['weights'] = copy('bad_weights'); (broken['weights'] / 'model.safetensors').write_bytes(b'\x00' * 100)
    broken['config'] = copy('bad_config'); (broken['config'] / 'config.json').write_text('{"preset": {"name": ')
    broken['metrics'] = copy('bad_metrics')
    with (broken['metrics'] / 'metrics.jsonl').open('a') as f: f.write('{"step": 31, "loss": \n')
    broken['mismatch'] = copy('mismatch')
    config = json.loads((broken['mismatch'] / 'config.json').read_text())
    config['preset']['model']['latent_dim'] = 3
    (broken['mismatch'] / 'config.json').write_text(json.dumps(config))
    return broken


def bad_input_cases(tiny_run: Path, broken: dict[str, Path]) -> list[tuple[tuple, str]]:
    return [((broken['empty'],), 'is not a run directory'),
            ((broken['weights'],), 'is corrupt or not safetensors'),
            ((broken['config'],), 'config.json is corrupt'),
            ((tiny_run, '--no-such-option'), 'unrecognized arguments'),
            # the same entry point, called in this process (starting Python and PyTorch for each costs seconds)
            ((broken['missing'],), 'does not exist'),
            ((broken['metrics'],), 'metrics.jsonl is corrupt: line'),
            ((broken['mismatch'],), 'model expects'),
            ((tiny_run, '--weights', 'nothing.safetensors'), 'does not exist'),
            ((tiny_run, '--k', '0'), '--k must be at least 1'),
            ((tiny_run, '--split', 'validation'), "--split must be 'test', 'valid' or 'train'"),
            ((tiny_run, '--split', 'valid'), "dataset 'digits' has no validation split"),
            ((tiny_run, '--max_examples', '-3'), '--max-examples must be positive')]

IN_SUBPROCESS = 4


def check_one_line(args, expected, code, out, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (args, code, err)
    assert lines[0].startswith('hvae_nb.evaluate: error: ') and expected in lines[0], (args, lines[0])
    assert out == ''


def test_bad_input_is_one_line_and_exit_status_2(tiny_run, tmp_path, capsys):
    broken = corrupt_copies(tiny_run, tmp_path)
    cases = bad_input_cases(tiny_run, broken)
    processes = [subprocess.Popen(evaluate_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
                 for args, _ in cases[:IN_SUBPROCESS]]
    for (args, expected), process in zip(cases, processes):
        out, err = process.communicate(timeout=300)
        check_one_line(args, expected, process.returncode, out, err)
    for args, expected in cases[IN_SUBPROCESS:]:
        with pytest.raises(SystemExit) as exit_status: main([*map(str, args), '--no-progress'])
        out, err = capsys.readouterr()
        check_one_line(args, expected, exit_status.value.code, out, err)
    assert not any((folder / 'eval.json').exists() for folder in broken.values())


def test_an_evaluation_in_parts_resumes_and_equals_one_pass(tiny_run, tmp_path, capsys, monkeypatch):
    "Two parts, one stopped after its first block and resumed, give exactly the numbers of one pass."
    import hvae_nb.evaluate as evaluate_module
    run_dir, whole_dir = tmp_path / 'run', tmp_path / 'whole'
    for folder in (run_dir, whole_dir):
        shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns('checkpoints', 'figures', 'eval*'))
    part = lambda i, *more: main([str(run_dir), '--k', '3', '--batch-size', '50', '--parts', '2', '--part', str(i),
                                  '--no-figures', '--no-progress', *more])
    original, calls = evaluate_module.score_images, []
    def stop_during_the_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(evaluate_module, 'score_images', stop_during_the_second_block)
    with pytest.raises(KeyboardInterrupt): part(0)
    monkeypatch.setattr(evaluate_module, 'score_images', original)
    folder = run_dir / 'eval_parts' / 'test_k3_batch50'
    assert json.loads((folder / 'part_0_of_2.json').read_text())['blocks_done'] == 1
    part(1)
    assert 'waiting for part(s) 0' in capsys.readouterr().out and not (run_dir / 'eval.json').exists()
    with pytest.raises(SystemExit): main([str(run_dir), '--k', '3', '--batch-size', '50', '--parts', '2', '--combine'])
    assert 'parts 0 of 2 are not complete' in capsys.readouterr().err
    # other weights (by content) cannot resume a part
    weights = run_dir / 'model.safetensors'
    kept = weights.read_bytes()
    save_file({key: value + 1e-3 for key, value in load_file(weights).items()}, weights)
    with pytest.raises(SystemExit): part(0)
    assert 'computed with other weights_sha256' in capsys.readouterr().err
    weights.write_bytes(kept)
    # a crash between a save's two files: the tensors hold rows the JSON does not count yet
    saved = load_file(folder / 'part_0_of_2.safetensors')
    save_file({key: torch.cat([value, value[:7]]) for key, value in saved.items()}, folder / 'part_0_of_2.safetensors')
    part(0)                                      # resumes after its first block, and, last, writes the result
    assert 'resuming after 1 of 3 blocks' in capsys.readouterr().err
    umask = os.umask(0); os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes    # readable as the umask says (safetensors alone: 0600)
    result = Run.open(run_dir).evaluations()['test_k3_batch50']
    assert (result['num_examples'], result['split_size'], result['parts']) == (297, 297, 2)
    # the blocks are seeded by their number: one pass gives every image the same numbers, the mean exactly
    whole = evaluate_run(whole_dir, k=3, batch_size=50, figures=False, progress=False)
    assert whole['name'] == result['name'] and whole['nll_nats'] == result['nll_nats']
    assert whole['kl_per_group_nats'] == result['kl_per_group_nats']


def test_temperatures_and_batch_norm_readjustment(tmp_path, capsys, monkeypatch):
    "Samples at a temperature per group, and NVAE's batch-norm readjustment, guarded against NaN."
    import hvae_nb.evaluate as evaluate_module
    from hvae_nb.train import train
    preset = apply_overrides(get_preset('lvae_digits'), {'max_steps': '20', 'eval_every': '100', 'save_every': '20',
                                                        'final_eval_samples': '2'})
    run_dir = tmp_path / 'run'
    trained = train(preset, out=run_dir, progress=False)
    stored = {k: v.clone() for k, v in trained.model.state_dict().items()}
    result = evaluate_run(run_dir, k=2, max_examples=20, temperature='0.5,0.7,1', readjust_bn=3, progress=False)
    assert result['readjust_bn'] == dict(passes=3, temperature=(0.5, 0.7, 1.0), applied=True)
    assert {'temperatures.png', 'latents.png'} <= set(result['figures'])
    on_disk = Run.open(run_dir).model()
    assert all(torch.equal(stored[k], v) for k, v in on_disk.state_dict().items())   # the weights on disk untouched
    # statistics that come out non-finite are refused, and the stored ones kept for the samples
    def poisoned(model, *args, **kwargs):
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm): m.running_var.fill_(float('nan'))
        return model
    monkeypatch.setattr(evaluate_module, 'readjust_batch_norm', poisoned)
    refused = evaluate_run(run_dir, k=2, max_examples=20, readjust_bn=3, progress=False)
    assert not refused['readjust_bn']['applied'] and 'non-finite' in refused['readjust_bn']['why']
    with pytest.raises(SystemExit): main([str(run_dir), '--temperature', '0.5,1', '--no-progress'])
    assert 'this model has 3 groups' in capsys.readouterr().err


def test_an_evaluation_of_one_image_draws_every_figure(tiny_run, tmp_path):
    "The latents figure interpolates between two images: with one, from the image to itself (it stopped with a traceback)."
    run_dir = tmp_path / 'run'
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns('checkpoints', 'figures', 'eval*'))
    result = evaluate_run(run_dir, k=2, max_examples=1, progress=False)
    assert result['num_examples'] == 1 and sorted(result['figures']) == sorted(FIGURE_NAMES)
