"""Every mistake a user can make ends as one line naming the problem, exit status 2, no traceback, and nothing in an
existing run directory changed: flags, overrides, data files, paths (missing, not a directory, not writable), run
directories and checkpoints. Most cases call the commands' entry points in this process (starting Python and PyTorch
for each costs seconds); one per command runs the real command line, to show that no traceback escapes it. Also the
stumbles of a new user: extending a finished run, resuming one, a warm-up longer than the run, and the help text."""
import gzip, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from hvae_nb import train as train_module
from hvae_nb import evaluate as evaluate_module
from hvae_nb import bench as bench_module
from shared_runs import TINY_RUN_STEPS

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder): return {p: p.stat().st_mtime_ns for p in Path(folder).rglob('*')}


def one_line_error(capsys, main, argv, program):
    with pytest.raises(SystemExit) as exit_status: main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_status.value.code == 2 and len(lines) == 1, (argv, exit_status.value.code, err)
    assert lines[0].startswith(f'{program}: error: '), lines[0]
    return lines[0]


@pytest.fixture(scope='module')
def corrupt_mnist(tmp_path_factory):
    "A data directory whose MNIST training images are a gzip file holding garbage."
    folder = tmp_path_factory.mktemp('data')
    (folder / 'mnist').mkdir()
    for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
                 't10k-labels-idx1-ubyte.gz'):
        (folder / 'mnist' / name).write_bytes(gzip.compress(b'not an IDX file'))
    return folder


def train_cases(tmp_path, tiny_run, corrupt_mnist):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    return [  # (argv, what the line must say)
        # flags
        (['--max-steps', 'many'], "argument --max-steps: invalid int value: 'many'"),
        (['--mixed-precision', 'fp8'], 'mixed_precision must be no, fp16 or bf16'),
        (['--epochs', '-1', '--preset', 'vae_digits'], '--epochs must be positive'),
        # overrides: unknown, unparsable, out of range, and a configuration the model cannot build
        (['--override', 'train.learning_rate=1e-3'], "did you mean 'train.lr'?"),
        (['--override', 'lr=fast'], 'expected a value of type float'),
        (['--override', 'lr=nan'], 'TrainConfig.lr must be a finite number'),
        (['--override', 'ema_decay=1'], 'TrainConfig.ema_decay must be'),
        (['--override', 'model.hidden_dims=8,8'], 'LVAEConfig.hidden_dims must be the same length as latent_dims'),
        (['--override', 'model.latent_dims=4,0,2'], 'LVAEConfig.latent_dims must be a tuple'),
        (['--override', 'dataset=imagenet'], "unknown dataset 'imagenet': not built in (digits, mnist"),
        (['--dataset', 'my pets/'], 'Preset.dataset must be one of digits, mnist'),
        (['--override', 'lr'], "override 'lr' is not of the form key=value"),
        # data: a missing, a non-directory and a corrupt data directory
        (['--preset', 'vae_mnist', '--data-dir', str(tmp_path / 'nothing')], 'does not exist'),
        (['--preset', 'vae_mnist', '--data-dir', str(a_file)], 'is a file, not a directory'),
        (['--preset', 'vae_mnist', '--data-dir', str(corrupt_mnist)], 'train-images-idx3-ubyte.gz'),
        (['--preset', 'vae_mnist', '--data-dir', str(tmp_path)], 'not found. Put train-images-idx3-ubyte.gz'),
        # output paths: a file, under a file, not writable
        (['--out', str(a_file)], 'is a file, not a directory'),
        (['--out', str(a_file / 'run')], 'is a file, not a directory'),
        (['--out', '/proc/hvae_nb_test/run'], 'cannot create run directory /proc/hvae_nb_test/run'),
        # run directories and checkpoints
        (['--out', str(tiny_run)], 'already holds a run'),
        (['--resume', str(tmp_path / 'nothing')], 'cannot resume'),
        (['--resume', str(tiny_run)], f'already finished at step {TINY_RUN_STEPS}'),
        (['--resume', str(tiny_run), '--max-steps', str(TINY_RUN_STEPS // 2)], 'a run cannot be shortened'),
        (['--resume', str(tiny_run), '--preset', 'lvae_digits'], 'cannot resume preset'),
    ]


def test_train_bad_input_is_one_line_and_changes_nothing(tmp_path, tiny_run, corrupt_mnist, capsys):
    before = snapshot(tiny_run)
    for argv, expected in train_cases(tmp_path, tiny_run, corrupt_mnist):
        line = one_line_error(capsys, train_module.main, argv + ['--no-progress'], 'hvae_nb.train')
        assert expected in line, (argv, line)
    assert snapshot(tiny_run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']        # no run directory was started


def test_a_corrupt_checkpoint_is_one_line(tiny_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / 'copy'
    shutil.copytree(tiny_run, copy)
    latest = sorted((copy / 'checkpoints').iterdir())[-1]
    (latest / 'train_state.json').write_text('{not json')
    before = snapshot(copy)
    line = one_line_error(capsys, train_module.main,
                          ['--resume', str(latest), '--max-steps', str(TINY_RUN_STEPS + 10), '--no-progress'],
                          'hvae_nb.train')
    assert 'train_state.json' in line and 'is corrupt' in line
    assert snapshot(copy) == before


def test_the_real_command_line_prints_no_traceback(tmp_path):
    environment = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    for module, args in (('hvae_nb.train', ['--override', 'model.latent_dims=4,0,2', '--no-progress']),
                         ('hvae_nb.evaluate', [str(tmp_path)]),
                         ('hvae_nb.bench', ['--threads', '0'])):
        done = subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, cwd=ROOT,
                              env=environment, timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (module, done.stderr)
        assert 'Traceback' not in done.stderr


def test_evaluate_and_bench_bad_input(tmp_path, tiny_run, capsys):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    before = snapshot(tiny_run)
    for argv, expected in [([str(a_file)], 'is not a run directory: it is a file'),
                           ([str(tmp_path / 'nothing')], 'does not exist'),
                           ([str(tiny_run), '--k', '0'], '--k must be at least 1'),
                           ([str(tiny_run), '--data-dir', str(a_file)], 'is a file, not a directory')]:
        assert expected in one_line_error(capsys, evaluate_module.main, argv + ['--no-progress'], 'hvae_nb.evaluate')
    assert snapshot(tiny_run) == before
    for argv, expected in [(['--presets', 'no_such_preset'], "unknown preset 'no_such_preset'"),
                           (['--out', str(a_file / 'x.jsonl')], 'cannot write there')]:
        assert expected in one_line_error(capsys, bench_module.main, argv, 'hvae_nb.bench')


def test_extending_a_finished_run_rebuilds_its_schedule(tiny_run, tmp_path, capsys):
    import shutil
    from hvae_nb.train import make_optimizer, make_scheduler
    from hvae_nb.configs import TrainConfig
    run_dir, steps_before, steps_after = tmp_path / 'extended', TINY_RUN_STEPS, TINY_RUN_STEPS + 40
    shutil.copytree(tiny_run, run_dir)
    train_module.main(['--resume', str(run_dir), '--max-steps', str(steps_after), '--no-progress'])
    err = capsys.readouterr().err
    assert 'learning-rate schedule rebuilt' in err and 'max_steps' in err
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['preset']['train']['max_steps'] == steps_after
    assert config['history'][-1]['changed']['max_steps'] == dict(before=steps_before, after=steps_after)
    records = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    steps = {r['step']: r['lr'] for r in records if 'loss' in r}
    assert sorted(steps) == list(range(1, steps_after + 1)) and sum('test' in r for r in records) == 2  # per finish
    # the rates after the old end follow the longer cosine from there, not the shorter one restarted
    recipe = TrainConfig(**config['preset']['train'])
    optimizer = make_optimizer(torch.nn.Linear(1, 1), recipe)
    scheduler, expected = make_scheduler(optimizer, recipe), {}
    for step in range(1, steps_after + 1):      # the rate step s is taken at
        expected[step] = scheduler.get_last_lr()[0]; optimizer.step(); scheduler.step()
    extension = range(steps_before + 1, steps_after + 1)
    assert all(abs(steps[s] - expected[s]) < 1e-12 for s in extension)
    assert steps[steps_before + 1] > steps[steps_before] * 0.5 and max(steps[s] for s in extension) < steps[1]


def test_a_warmup_longer_than_the_run_warns_in_one_line(tmp_path, capsys):
    train_module.main(['--preset', 'lvae_digits', '--max-steps', '5', '--no-progress', '--out', str(tmp_path / 'r'),
                       '--override', 'final_eval_samples=2', 'eval_every=1000'])
    warnings = [l for l in capsys.readouterr().err.splitlines() if 'kl_warmup_steps' in l]
    assert len(warnings) == 1 and 'max_steps 5 < kl_warmup_steps 1000' in warnings[0]


def test_help_shows_the_readme_spelling_and_a_valid_example(capsys):
    with pytest.raises(SystemExit): train_module.main(['--help'])
    text = capsys.readouterr().out
    assert '--data-dir' in text and '--max-steps' in text and '--data_dir' not in text and '--max_steps' not in text
    from hvae_nb.configs import apply_overrides
    from hvae_nb.presets import get_preset
    example = text.split('e.g. --override', 1)[1].split('(repeatable)')[0].split()
    apply_overrides(get_preset(train_module.DEFAULT_PRESET), dict(item.split('=') for item in example))


def test_a_run_directory_of_an_older_version_says_so(tmp_path):
    "Run format 1 (before the bottom_up/top_down interface) named the ladder's blocks differently."
    from safetensors.torch import save_file
    from hvae_nb.configs import preset_to_dict
    from hvae_nb.presets import get_preset
    from hvae_nb.runs import RunError, from_pretrained
    preset = get_preset('lvae_digits')
    old_names = {k.replace('bottom_up_blocks.', 'bottom_up.').replace('top_down_blocks.', 'top_down.'): v
                 for k, v in preset.model.build().state_dict().items()}
    (tmp_path / 'config.json').write_text(json.dumps(dict(preset=preset_to_dict(preset), launch={})))
    save_file(old_names, tmp_path / 'model.safetensors')
    with pytest.raises(RunError, match='older version of hvae_nb'):
        from_pretrained(tmp_path)
