"""Reliability of `python -m hvae_nb.train`: resume after SIGKILL, a kill during a save, SIGTERM, non-finite
gradients, a too-high learning rate, two real processes, and bad input. All on CPU, deterministic."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from shared_runs import TINY_RUN_STEPS

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--preset', 'vae_digits', '--no-progress', '--override', 'log_every=1', 'eval_every=100000',
        'final_eval_samples=5', 'keep_checkpoints=100']

def environment(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    env.update(extra)
    return env

def train_command(*args): return [sys.executable, '-m', 'hvae_nb.train', *args]

def run(args, **kwargs):
    return subprocess.run(train_command(*args), capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=300, **kwargs)

def step_losses(run_dir) -> dict:
    lines = (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()
    return {r['step']: r['loss'] for r in map(json.loads, lines) if 'loss' in r}

def final_test(run_dir) -> dict:
    "The final evaluation's record in metrics.jsonl (the whole test split)."
    lines = (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()
    return [r['test'] for r in map(json.loads, lines) if 'test' in r][-1]

def checkpoints(run_dir): return sorted((Path(run_dir) / 'checkpoints').glob('checkpoint_*'))

def wait_for(condition, process, seconds=120):
    start = time.time()
    while not condition():
        assert process.poll() is None, f"training ended before the condition: {process.communicate()}"
        assert time.time() - start < seconds, "timed out"
        time.sleep(0.01)

# ---------------------------------------------------------------- resume

def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    args = TINY + ['--max-steps', '600', '--save-every', '100']
    reference = run(args + ['--out', str(tmp_path / 'reference')])
    assert reference.returncode == 0, reference.stderr
    killed_dir = tmp_path / 'killed'
    process = subprocess.Popen(train_command(*args, '--out', str(killed_dir)), env=environment(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any((c / 'train_state.json').exists() for c in checkpoints(killed_dir)), process)
    process.send_signal(signal.SIGKILL); process.wait()
    resumed_from = max(int(c.name.split('_')[1]) for c in checkpoints(killed_dir) if (c / 'train_state.json').exists())
    assert resumed_from < 600, "the run finished before it could be killed"
    resumed = run(['--resume', str(killed_dir), '--no-progress'])
    assert resumed.returncode == 0, resumed.stderr
    expected, got = step_losses(tmp_path / 'reference'), step_losses(killed_dir)
    after = [s for s in expected if s > resumed_from]
    assert len(after) >= 100 and sorted(got) == sorted(expected)
    assert [got[s] for s in after] == [expected[s] for s in after]   # bit-for-bit, not approximately

def test_resume_restores_the_ema_weights(tmp_path):
    "With EMA on, the final weights (the EMA's) of a run resumed mid-way equal those of the uninterrupted run."
    import shutil
    args = TINY + ['--max-steps', '40', '--save-every', '20', '--override', 'ema_decay=0.9']
    full = run(args + ['--out', str(tmp_path / 'full')])
    assert full.returncode == 0, full.stderr
    shutil.copytree(tmp_path / 'full', tmp_path / 'half')
    shutil.rmtree(tmp_path / 'half' / 'checkpoints' / 'checkpoint_00000040')
    (tmp_path / 'half' / 'model.safetensors').unlink()
    resumed = run(['--resume', str(tmp_path / 'half'), '--no-progress'])
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / 'full' / 'model.safetensors'), load_file(tmp_path / 'half' / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = load_file(tmp_path / 'full' / 'checkpoints' / 'checkpoint_00000040' / 'model.safetensors')
    assert raw.keys() == a.keys() and not all(torch.equal(raw[k], a[k]) for k in a)   # final weights are the EMA's, not the raw ones

def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    "The second save is killed (SIGKILL) halfway: after the model is written, before the rename."
    script = f"""
import os, signal, sys
import accelerate
original = accelerate.Accelerator.save_state
calls = []
def save_state_then_die(self, output_dir, **kwargs):
    calls.append(output_dir)
    result = original(self, output_dir, **kwargs)
    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)
    return result
accelerate.Accelerator.save_state = save_state_then_die
sys.argv = ['hvae_nb.train'] + {TINY + ['--max-steps', '300', '--save-every', '100', '--out', str(tmp_path / 'run')]!r}
from hvae_nb.train import main
main()
"""
    died = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=300)
    assert died.returncode == -signal.SIGKILL
    folder = tmp_path / 'run' / 'checkpoints'
    assert sorted(p.name for p in folder.iterdir()) == ['.tmp_checkpoint_00000200', 'checkpoint_00000100']
    resumed = run(['--resume', str(tmp_path / 'run'), '--no-progress'])
    assert resumed.returncode == 0, resumed.stderr
    assert [c.name for c in checkpoints(tmp_path / 'run')] == ['checkpoint_00000100', 'checkpoint_00000200', 'checkpoint_00000300']
    assert not (folder / '.tmp_checkpoint_00000200').exists()

def test_time_budget_stops_saves_and_evaluates(tmp_path):
    result = run(TINY + ['--max-steps', '1000000', '--save-every', '1000000', '--override', 'max_minutes=0.05',
                         '--out', str(tmp_path / 'run')])
    assert result.returncode == 0, result.stderr
    assert 'time budget of 0.05 minutes used' in result.stderr and 'test NLL' in result.stdout
    records = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    last_step = max(step_losses(tmp_path / 'run'))
    assert 0 < last_step < 1_000_000 and records[-1]['step'] == last_step and 'test' in records[-1]
    assert [c.name for c in checkpoints(tmp_path / 'run')] == [f'checkpoint_{last_step:08d}']

def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    run_dir = tmp_path / 'run'
    process = subprocess.Popen(train_command(*TINY, '--max-steps', '100000', '--save-every', '100000', '--out', str(run_dir)),
                               env=environment(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / 'metrics.jsonl').exists() and len(step_losses(run_dir)) > 20, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert 'stopped by signal' in err
    saved = checkpoints(run_dir)
    assert len(saved) == 1 and (saved[0] / 'train_state.json').exists()
    assert json.loads((saved[0] / 'train_state.json').read_text())['step'] == max(step_losses(run_dir))

# ---------------------------------------------------------------- non-finite updates

def test_non_finite_gradients_are_skipped_and_counted():
    from accelerate import Accelerator
    from hvae_nb.presets import get_preset
    from hvae_nb.data import load_data
    from hvae_nb.train import batch_preparer, make_optimizer, step_micro_batches, train_step
    preset = get_preset('vae_digits')
    data = load_data('digits')
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = preset.model.build()
    optimizer = make_optimizer(model, preset.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(model.parameters())
    hook = first.register_hook(lambda grad: grad * float('nan'))
    prepare = batch_preparer(data, preset.train)
    record = train_step(model, optimizer, step_micro_batches(data.train, 0, preset.train), prepare, 0, 1.0, preset.train,
                        accelerator)
    assert record['skipped_update'] and not math.isfinite(record['grad_norm'])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # weights unchanged
    hook.remove()
    record = train_step(model, optimizer, step_micro_batches(data.train, 1, preset.train), prepare, 1, 1.0, preset.train,
                        accelerator)
    assert not record['skipped_update']
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())

def test_ten_times_the_learning_rate_for_1000_steps_ends_finite(tmp_path):
    result = run(TINY + ['--max-steps', '1000', '--lr', str(10 * 2e-3), '--save-every', '1000', '--out', str(tmp_path / 'run')])
    assert result.returncode == 0, result.stderr
    weights = load_file(tmp_path / 'run' / 'model.safetensors')
    assert all(torch.isfinite(w).all() for w in weights.values())
    records = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert records[-1]['step'] == 1000 and math.isfinite(records[-1]['test']['nll_nats'])

# ---------------------------------------------------------------- two processes

def test_two_cpu_processes_match_one_process_on_the_same_global_batch(tmp_path):
    args = TINY + ['--max-steps', '8', '--batch-size', '64', '--save-every', '4']
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
              '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29517', '-m', 'hvae_nb.train']
    two = subprocess.run(launch + args + ['--out', str(tmp_path / 'two')], capture_output=True, text=True,
                         env=environment(ACCELERATE_USE_CPU='1'), cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(args + ['--grad-accum', '2', '--out', str(tmp_path / 'one')])
    assert one.returncode == 0, one.stderr
    config = json.loads((tmp_path / 'two' / 'config.json').read_text())
    assert config['launch']['num_processes'] == 2                       # world size 2 really ran
    a, b = step_losses(tmp_path / 'two'), step_losses(tmp_path / 'one')
    assert sorted(a) == list(range(1, 9))                               # one record per step: only rank 0 logs
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    # only rank 0 writes the run's files; the single rank-1 file is Accelerate's per-process RNG state in a checkpoint
    files = sorted(str(p.relative_to(tmp_path / 'two')) for p in (tmp_path / 'two').rglob('*') if p.is_file())
    rank1 = [f for f in files if '_1.' in Path(f).name]
    assert rank1 and all(Path(f).name == 'random_states_1.pkl' and f.startswith('checkpoints/') for f in rank1)
    assert two.stdout.count('test NLL') == 1
    # the final test NLL, shared out between the ranks and gathered: every test image, as one process
    shared, alone = final_test(tmp_path / 'two'), final_test(tmp_path / 'one')
    assert shared['num_examples'] == alone['num_examples'] == 297     # the digits' whole test split
    # the two runs' weights may differ by float rounding (an all-reduce against accumulation)
    assert abs(shared['nll_nats'] - alone['nll_nats']) < 1e-3, (shared, alone)
    # the two-rank run's own weights scored in this one process, on one thread as the ranks ran:
    # exactly the numbers the two ranks logged
    from hvae_nb.data import load_data
    from hvae_nb.runs import from_pretrained
    from hvae_nb.vae import dataset_nll
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try: reference = dataset_nll(from_pretrained(tmp_path / 'two'), load_data('digits').test, 5)
    finally: torch.set_num_threads(threads)
    assert shared == reference

# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('args, message', [
    (['--preset', 'no_such_preset'], "unknown preset 'no_such_preset'"),
    (['--preset', 'vae_digits', '--override', 'latent_dimm=3'], "unknown override 'latent_dimm'"),
    (['--preset', 'vae_digits', '--override', 'latent_dim=three'], 'expected a value of type int'),
    (['--preset', 'vae_digits', '--batch-size', '0'], 'batch_size must be positive'),
    (['--preset', 'vae_digits', '--batch-size', '-3'], 'batch_size must be positive'),
    (['--preset', 'vae_mnist', '--data-dir', '/no/such/dir'], 'data directory /no/such/dir does not exist'),
    (['--preset', 'vae_digits', '--mixed-precision', 'fp8'], 'mixed_precision must be no, fp16 or bf16'),
    (['--preset', 'vae_digits', '--log-with', 'nosuchtracker'], 'Unsupported logging capability'),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = run(args + ['--out', str(tmp_path / 'run'), '--no-progress'])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / 'run').exists()

def snapshot(folder): return {p: p.stat().st_mtime_ns for p in Path(folder).rglob('*')}

def test_resume_with_another_preset_is_refused(tiny_run):
    before = snapshot(tiny_run)
    result = run(['--preset', 'lvae_digits', '--resume', str(tiny_run), '--no-progress'])
    assert result.returncode == 2 and 'cannot resume' in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(tiny_run) == before

def test_a_new_run_never_overwrites_an_existing_one(tiny_run):
    before = snapshot(tiny_run)
    result = run(TINY + ['--max-steps', '5', '--out', str(tiny_run)])
    assert result.returncode == 2 and 'already holds a run' in result.stderr
    assert snapshot(tiny_run) == before

def test_corrupted_checkpoint_is_reported_not_loaded(tiny_run, tmp_path):
    import shutil
    copy = tmp_path / 'copy'
    shutil.copytree(tiny_run, copy)
    latest = checkpoints(copy)[-1]
    (latest / 'model.safetensors').write_bytes(b'\x00' * 100)
    before = snapshot(copy)
    result = run(['--resume', str(copy), '--max-steps', str(TINY_RUN_STEPS + 10), '--no-progress'])
    assert result.returncode == 2, result.stderr
    assert 'is corrupt' in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(copy) == before

def test_tensorboard_tracker_writes_event_files(tmp_path):
    result = run(TINY + ['--max-steps', '5', '--log-with', 'tensorboard', '--out', str(tmp_path / 'run')])
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / 'run').rglob('events.out.tfevents.*'))

def test_from_pretrained_loads_the_final_weights(tiny_run):
    from hvae_nb.runs import from_pretrained
    model = from_pretrained(tiny_run)
    assert model.sample(4).shape == (4, 1, 8, 8)


def test_every_file_of_a_run_is_readable_as_the_umask_says(tiny_run):
    "safetensors writes its files for their owner only (0600): the weights, checkpoints and EMA must follow the umask."
    umask = os.umask(0); os.umask(umask)
    modes = {str(p.relative_to(tiny_run)): p.stat().st_mode & 0o777 for p in tiny_run.rglob('*') if p.is_file()}
    assert any(name.endswith('ema.safetensors') for name in modes) and any('checkpoints' in n for n in modes)
    assert {n: m for n, m in modes.items() if m != 0o666 & ~umask} == {}
