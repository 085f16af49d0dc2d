"""`python -m hvae_nb.bench`: the JSON lines and the table, and sane numbers. Timings depend on the machine and on
whatever else runs on it, so no test asserts one: throughputs are positive, FLOPs are what the architecture implies,
the utilisation is a fraction and follows from the architecture's FLOPs; the timing itself is checked on a call of
known duration, and the MFU on a throughput and a peak set by the test."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # test the working tree even when the package is not pip-installed

from hvae_nb import bench  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402

ENVIRONMENT = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
QUICK = ['--steps', '2', '--repeats', '2', '--warmup', '1', '--budget', '1']
FIELDS = {'preset', 'status', 'device', 'device_name', 'torch', 'parameters', 'batch_size', 'image_shape', 'compile',
          'channels_last', 'threads', 'train_images_per_s', 'train_images_per_s_repeats', 'train_steps_per_repeat', 'first_step_s',
          'sample_images_per_s', 'sample_images_per_s_repeats', 'peak_memory_bytes', 'baseline_rss_bytes', 'memory_measure',
          'flops_per_step', 'flops_per_image', 'achieved_flops_per_s', 'matmul_peak_flops_per_s', 'mfu'}


def bench_command(*args) -> list:
    return [sys.executable, '-m', 'hvae_nb.bench', *map(str, args)]


def mlp_vae_training_flops(config, batch: int) -> int:
    "Forward 2*B*in*out per linear layer, backward twice that, except the first layer's input gradient."
    pixels = 1
    for size in config.image_shape: pixels *= size
    encoder = (pixels, *config.hidden_dims, 2 * config.latent_dim)
    decoder = (config.latent_dim, *config.hidden_dims[::-1], pixels)
    layers = lambda widths: sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return 6 * batch * (layers(encoder) + layers(decoder)) - 2 * batch * pixels * config.hidden_dims[0]


@pytest.fixture(scope='module')
def two_presets(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.jsonl'
    done = subprocess.run(bench_command('--presets', 'vae_digits', 'lvae_digits', '--batch-size', '32', '--out', out, *QUICK),
                          capture_output=True, text=True, env=ENVIRONMENT, timeout=600)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in out.read_text().splitlines()], done.stdout


def test_json_lines(two_presets):
    results, _ = two_presets
    assert [(r['preset'], r['status']) for r in results] == [('vae_digits', 'ok'), ('lvae_digits', 'ok')]
    for r in results:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert (r['batch_size'], r['device'], r['compile'], r['channels_last']) == (32, 'cpu' if not torch.cuda.is_available() else 'cuda', False, False)
        assert r['parameters'] == sum(p.numel() for p in get_preset(r['preset']).model.build().parameters())
        for key in ('train_images_per_s', 'sample_images_per_s', 'flops_per_step', 'achieved_flops_per_s', 'matmul_peak_flops_per_s', 'peak_memory_bytes'):
            assert r[key] > 0, key
        assert all(v > 0 for v in r['train_images_per_s_repeats'] + r['sample_images_per_s_repeats'])
        assert min(r['train_images_per_s_repeats']) <= r['train_images_per_s'] <= max(r['train_images_per_s_repeats'])
        assert 0 < r['mfu'] <= 1, r['mfu']
    vae = results[0]
    architecture_flops = mlp_vae_training_flops(get_preset('vae_digits').model, 32)
    assert vae['flops_per_step'] == architecture_flops
    assert vae['flops_per_image'] == architecture_flops / 32
    # FLOPs from the architecture's formula x the measured steps per second / the measured peak
    steps_per_s = vae['train_images_per_s'] / 32
    assert vae['mfu'] == pytest.approx(architecture_flops * steps_per_s / vae['matmul_peak_flops_per_s'])


def test_throughput_of_a_call_of_known_duration():
    "A call that sleeps 20 ms and carries 32 images runs at most 1600 images/s, and not far below on any machine."
    import time
    result = bench.measure_throughput(lambda: time.sleep(0.02), 32, torch.device('cpu'), steps=5, repeats=3,
                                      warmup=1, budget_s=2.0)
    assert len(result.repeats) == 3 and result.calls_per_repeat >= 5
    assert 0.5 * 1600 < result.images_per_s <= 1600, result


def test_mfu_from_a_known_throughput_and_peak(monkeypatch):
    "With the clock's answers fixed by the test, the MFU is the architecture's FLOPs x steps per second / peak."
    def known_throughput(call, images_per_call, *args, **kwargs):
        return bench.Throughput(images_per_s=1000.0, repeats=[1000.0], calls_per_repeat=1, first_call_s=0.0)
    monkeypatch.setattr(bench, 'measure_throughput', known_throughput)
    monkeypatch.setattr(bench, 'matmul_peak_flops', lambda device, *args, **kwargs: 2e11)
    result = bench.benchmark_preset(get_preset('vae_digits'), batch_size=16, device='cpu')
    flops = mlp_vae_training_flops(get_preset('vae_digits').model, 16)
    assert result['mfu'] == pytest.approx(flops * (1000.0 / 16) / 2e11)
    assert result['achieved_flops_per_s'] == pytest.approx(flops * 1000.0 / 16)


def test_table(two_presets):
    _, stdout = two_presets
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:3] == ['preset', 'params', 'batch'] and 'MFU' in lines[0]
    assert [l.split()[0] for l in lines[2:4]] == ['vae_digits', 'lvae_digits'] and all(l.split()[-1] == 'ok' for l in lines[2:4])
    assert lines[-1].startswith('device: ') and 'matmul peak' in lines[-1]
    assert not any(l.startswith('{') for l in lines)           # with --out the JSON lines go to the file only


def test_out_of_memory_and_failures_are_reported(monkeypatch):
    "A preset that does not fit is a result with status 'oom', not a crash; so is any other failure, as 'error'."
    preset = get_preset('vae_digits')
    def out_of_memory(*args, **kwargs): raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
    monkeypatch.setattr(bench, 'benchmark_preset', out_of_memory)
    assert bench.benchmark_or_report(preset)['status'] == 'oom'
    def broken(*args, **kwargs): raise RuntimeError('something else')
    monkeypatch.setattr(bench, 'benchmark_preset', broken)
    result = bench.benchmark_or_report(preset)
    assert (result['status'], result['error']) == ('error', 'RuntimeError: something else')
    assert 'oom' in bench.format_table([dict(preset='big', status='oom', error='x')])


def check_one_line(args, expected, code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (args, code, err)
    assert lines[0].startswith('hvae_nb.bench: error: ') and expected in lines[0], (args, lines[0])


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    in_subprocess = [(('--presets', 'vae_digit'), "unknown preset 'vae_digit'"),
                     (('--repeats', 'many'), "invalid int value: 'many'")]
    # the same entry point, called in this process (starting Python and PyTorch for each costs seconds)
    in_process = [(('--steps', '0'), '--steps must be positive'),
                  (('--batch_size', '-1'), '--batch-size must be positive'),
                  (('--device', 'nonsense'), 'is not a device'),
                  (('--out', tmp_path / 'no' / 'such' / 'dir' / 'x.jsonl', '--presets', 'vae_digits'), 'cannot write there')]
    processes = [subprocess.Popen(bench_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
                 for args, _ in in_subprocess]
    for (args, expected), process in zip(in_subprocess, processes):
        _, err = process.communicate(timeout=300)
        check_one_line(args, expected, process.returncode, err)
    for args, expected in in_process:
        with pytest.raises(SystemExit) as exit_status: bench.main([str(a) for a in args])
        check_one_line(args, expected, exit_status.value.code, capsys.readouterr().err)


def test_the_largest_batch_within_a_memory_budget(monkeypatch):
    "Doubling then bisecting, each try a benchmark run: against a memory that grows by 1 MiB an image."
    from hvae_nb import bench
    tried = []
    def fake_run(name, options):
        tried.append(options['batch_size'])
        return dict(status='ok', peak_memory_bytes=(100 + options['batch_size']) * 2**20)
    monkeypatch.setattr(bench, 'run_isolated', fake_run)
    result = bench.largest_batch('vae_digits', 400, {})
    assert result['largest_batch'] == 300 and result['peak_mib'] == 400
    assert tried[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] and len(tried) < 20
    monkeypatch.setattr(bench, 'run_isolated', lambda name, options: dict(status='oom'))
    assert bench.largest_batch('vae_digits', 400, {})['largest_batch'] == 0


def kept_for_backward(name: str, batch: int, every: int) -> int:
    "Bytes of the tensors a forward keeps for the backward, one in every `every` blocks recomputing."
    from hvae_nb.vae import checkpoint_activations
    torch.manual_seed(0)
    model = get_preset(name).model.build().train()
    checkpoint_activations(model, every)
    kept = []
    def pack(t): kept.append(t.numel() * t.element_size()); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.bernoulli(torch.full((batch, 1, 8, 8), 0.3)))
    return sum(kept)


def test_activation_checkpointing_lowers_the_peak_of_a_step_and_keeps_its_loss_and_flops():
    """nvae_digits at batch 512, each in its own process, every block recomputed (N = 1) against none:
    the peak falls by a good part of what autograd keeps the less (counted by saved-tensor hooks)."""
    options = dict(batch_size=512, steps=1, repeats=1, warmup=1, budget_s=0.5, threads=1)
    plain = bench.run_isolated('nvae_digits', dict(options, activation_checkpointing=0))
    saved = bench.run_isolated('nvae_digits', dict(options, activation_checkpointing=1))
    assert plain['status'] == saved['status'] == 'ok', (plain, saved)
    assert (plain['checkpointed_blocks'], saved['checkpointed_blocks']) == (0, 15)
    assert (plain['activation_checkpointing'], saved['activation_checkpointing']) == (0, 1)
    assert saved['first_step_loss'] == plain['first_step_loss']
    assert saved['flops_per_step'] == plain['flops_per_step']     # the model's: no recomputation
    expected = kept_for_backward('nvae_digits', 512, 0) - kept_for_backward('nvae_digits', 512, 1)
    assert expected > 100 * 2**20
    assert plain['peak_memory_bytes'] - saved['peak_memory_bytes'] > 0.4 * expected, \
        (plain['peak_memory_bytes'], saved['peak_memory_bytes'], expected)
    assert '(recompute 1/1)' in bench.format_table([saved])


def test_the_fit_search_passes_activation_checkpointing_to_every_try(monkeypatch, capsys):
    asked = []
    def fake_run(name, options):
        asked.append(options['activation_checkpointing'])
        return dict(status='ok', peak_memory_bytes=(100 + options['batch_size']) * 2**20)
    monkeypatch.setattr(bench, 'run_isolated', fake_run)
    bench.main(['--presets', 'vdvae_digits', '--fit', '400', '--activation-checkpointing', '2'])
    assert asked and set(asked) == {2}
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])['activation_checkpointing'] == 2
    assert 'vdvae_digits: the largest batch within 400 MiB recomputing one in every 2 blocks is 300' in out
    with pytest.raises(SystemExit):
        bench.main(['--presets', 'vdvae_digits', '--activation-checkpointing', '-1'])
    assert '--activation-checkpointing must be 0 (off)' in capsys.readouterr().err


def test_the_table_names_the_peaks_it_divides_by(two_presets):
    "The measured peak's arithmetic (TF32 on a GPU when cuDNN uses it), and on a GPU the datasheet's."
    _, stdout = two_presets
    assert "measured in float32 (the run's precision)" in stdout.strip().splitlines()[-1]
    gpu = dict(preset='vdvae_cifar10', status='ok', device_name='NVIDIA H100 80GB HBM3', threads=16,
               parameters=39e6, batch_size=32, train_images_per_s=500.0, sample_images_per_s=900.0,
               peak_memory_bytes=9 * 2**30, flops_per_step=2e13, mfu=0.75,
               matmul_peak_flops_per_s=4.0e14, peak_dtype='float32', peak_math='tfloat32',
               datasheet_peak_flops_per_s=4.94e14, datasheet_mfu=2e13 * 500 / 32 / 4.94e14,
               memory_measure='torch.cuda.max_memory_allocated')
    lines = bench.format_table([gpu]).splitlines()
    assert lines[0].split()[-3:] == ['sheet', 'MFU', 'status']
    assert lines[2].split()[-3:] == ['0.750', f'{2e13 * 500 / 32 / 4.94e14:.3f}', 'ok']
    assert 'measured in tfloat32' in lines[-1] and 'datasheet' in lines[-1] and '494 TFLOP/s' in lines[-1]
    assert bench.peak_math(torch.device('cpu'), torch.float32) == 'float32'
    assert bench.peak_math(torch.device('cpu'), torch.bfloat16) == 'bfloat16'


class _SlowImages(torch.utils.data.Dataset):
    "Images that take at least `delay` seconds each to read: a slow disk, made certain."
    def __init__(self, images, delay: float):
        self.images, self.delay, self.scale = images, delay, images.scale
    def __len__(self): return len(self.images)
    def __getitems__(self, indices):                     # what the loader asks for: a uint8 batch
        import time
        time.sleep(self.delay * len(indices))
        return self.images.uint8(indices)


def test_the_loader_benchmark_sees_a_slow_source():
    "--loader's measurements against sources whose read time is known from below (sleeps), never a wall time asserted."
    from hvae_nb.data import load_data
    images = load_data('digits').train
    fast = bench.data_wait_share(get_preset('vae_digits'), images, 8, 0, steps=2, device='cpu')
    assert 0 <= fast['share'] < 1 and fast['wait_s'] <= fast['step_s']
    slow_images = _SlowImages(images, 0.01)
    slow = bench.data_wait_share(get_preset('vae_digits'), slow_images, 8, 0, steps=2, device='cpu')
    assert slow['wait_s'] >= 8 * 0.01                     # eight images of at least 10 ms each per batch
    assert bench.loader_throughput(slow_images, 8, 0, batches=2, warmup=1) <= 100   # at most 1 / 10 ms
    rows = bench.loader_benchmark(workers=(0,), batch_size=8, batches=2,
                                  sources={'packed 8 px': (8, 32), 'JPEG folder, to 8 px': (8, 16)})
    assert [(r['source'], r['num_workers']) for r in rows] == [('packed 8 px', 0), ('JPEG folder, to 8 px', 0)]
    assert all(r['images_per_s'] > 0 for r in rows)
