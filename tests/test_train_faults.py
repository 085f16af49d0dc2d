"""Faults of the paths a GPU run takes, reproduced on a CPU by injecting what the GPU path does, and the smaller
faults of the trainer and the benchmark: each of these tests failed before its fix.

- fp16: a GradScaler (the CPU one, put where Accelerate puts CUDA's) and a skipped update;
- an evaluation during training must leave every parameter and buffer (batch norm's running statistics) unchanged;
- several processes share an evaluation and get the number one process gets (two CPU ranks);
- the logged learning rate is the one the step was taken at; the time budget counts every resume;
- monitoring uses validation images, never the test split (`train()`'s own evaluations); the training curves
  plot the -ELBO, not the beta-weighted loss; batch norms can be synchronised across processes;
- the benchmark's MFU divides by a peak measured in the run's precision."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hvae_nb.configs import apply_overrides  # noqa: E402
from hvae_nb.data import load_data  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.runs import Run  # noqa: E402
from hvae_nb import train as train_module  # noqa: E402
from hvae_nb.train import (batch_preparer, build_model, make_ema, make_optimizer, monitoring_split,  # noqa: E402
                           save_sample_grid, shared_nll, step_micro_batches, train_step)


def environment(**extra):
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MPLBACKEND='Agg', **extra)


def test_fp16_survives_a_skipped_update():
    "A skipped update must still end the GradScaler's iteration, or the next unscale_() raises."
    torch.manual_seed(0)
    preset = get_preset('vae_digits')
    recipe = apply_overrides(preset, {'skip_threshold': '1e-9'}).train        # every update is skipped
    data = load_data('digits')
    accelerator = Accelerator(cpu=True, mixed_precision='fp16')
    model = preset.model.build()
    model, optimizer = accelerator.prepare(model, make_optimizer(model, recipe))
    # what Accelerate sets up on a GPU for fp16: a gradient scaler that the backward scales with and
    # clip_grad_norm_ unscales through
    accelerator.scaler = optimizer.scaler = torch.amp.GradScaler('cpu')
    accelerator.native_amp = True
    prepare = batch_preparer(data, recipe)
    try:
        for step in range(3):
            record = train_step(model, optimizer, step_micro_batches(data.train, step, recipe), prepare, step, 1.0,
                                recipe, accelerator)
            assert record['skipped_update']
    finally:                      # Accelerate's state is one per process: the other tests want no fp16
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)


def test_an_evaluation_during_training_leaves_every_weight_and_buffer_unchanged(tmp_path):
    torch.manual_seed(0)
    preset = get_preset('lvae_digits')                  # batch norm: running statistics that move in train mode
    model = build_model(preset).train()
    ema = make_ema(model, 0.99)
    data = load_data('digits')
    monitor, _ = monitoring_split(data, 50)
    for evaluated in (model, ema.module):
        before = {key: value.clone() for key, value in evaluated.state_dict().items()}
        shared_nll(evaluated, monitor, 5)
        save_sample_grid(evaluated, tmp_path / 'grid.png')
        after = evaluated.state_dict()
        changed = [key for key in before if not torch.equal(before[key], after[key])]
        assert changed == [], changed
    assert model.training                                 # and the mode is restored


def test_monitoring_uses_validation_images_never_the_test_split():
    digits = load_data('digits')                          # no validation split: held out of training
    monitor, trained_on = monitoring_split(digits, 100)
    assert len(monitor) == 100 and len(trained_on) == 1400
    kept = set(trained_on.rows.tolist())
    held = sorted(set(range(1500)) - kept)                      # the 100 images left out of training ...
    assert len(held) == 100 and len(kept) == 1400
    # ... are the ones monitored, binarised once as the test split is
    from hvae_nb.data import fixed_binarization
    assert torch.equal(monitor[:], fixed_binarization(digits.train.subset(held), 1234)[:])
    with_valid = load_data('binarized_mnist') if (Path(os.environ.get('HVAE_DATA', '')) / 'binarized_mnist').is_dir() \
        else None
    if with_valid is not None:                             # a validation split: a subset of it, training untouched
        monitor, trained_on = monitoring_split(with_valid, 100)
        assert monitor.array is with_valid.valid.array and trained_on is with_valid.train


@pytest.fixture(scope='module')
def monitored_run(tmp_path_factory):
    """Six steps of vae_digits under a KL warm-up (its loss weighs the KL by beta < 1, so it is not
    the bound), evaluated at steps 3 and 6, the scorer's images recorded: (records, scored)."""
    scored, scorer = [], train_module.shared_nll
    def recording(model, images, num_samples, progress=False):
        scored.append(images[:].clone())
        return scorer(model, images, num_samples, progress)
    recipe = apply_overrides(get_preset('vae_digits'), {
        'max_steps': '6', 'eval_every': '3', 'log_every': '1', 'eval_examples': '40',
        'eval_samples': '2', 'final_eval_samples': '2', 'kl_warmup_steps': '100'})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, 'shared_nll', recording)
        result = train_module.train(recipe, out=tmp_path_factory.mktemp('monitored') / 'run',
                                    progress=False)
    return result.metrics, scored


def test_train_monitors_the_held_out_images_and_scores_the_test_split_at_the_end(monitored_run):
    records, scored = monitored_run
    digits = load_data('digits')                          # no validation split: held out of training
    monitor = monitoring_split(digits, 40)[0][:]
    test = digits.test[:]
    assert len(scored) == 3                               # steps 3 and 6, then the final evaluation
    for images in scored[:2]:
        assert torch.equal(images, monitor)
        assert not (images.shape == test.shape and torch.equal(images, test))
    assert torch.equal(scored[2], test)
    evaluations = [r['eval'] for r in records if 'eval' in r]
    assert [(e['split'], e['num_examples']) for e in evaluations] == [('held-out training', 40)] * 2
    assert [r['test']['num_examples'] for r in records if 'test' in r] == [len(test)]


def test_the_training_curves_plot_the_neg_elbo_beside_the_monitored_nll(monitored_run):
    "Not the beta-weighted loss: the -ELBO logged (reconstruction + every KL), read back off the axes."
    import matplotlib.pyplot as plt
    from hvae_nb.evaluate import plot_training_curves
    records, _ = monitored_run
    steps = [r for r in records if 'loss' in r]
    neg_elbo = [r['neg_elbo'] for r in steps]
    assert neg_elbo == pytest.approx([r['reconstruction'] + sum(r['kl']) for r in steps])
    assert all(r['loss'] < r['neg_elbo'] for r in steps)        # beta < 1: the loss is below the bound
    figure = plot_training_curves(records)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    plt.close(figure)
    elbo = [line for label, line in lines.items() if 'ELBO' in label]
    assert len(elbo) == 1
    assert list(elbo[0].get_xdata()) == [r['step'] for r in steps]
    assert list(elbo[0].get_ydata()) == neg_elbo
    assert not any(list(line.get_ydata()) == [r['loss'] for r in steps] for line in lines.values())
    monitored = [label for label in lines if 'held-out training' in label]
    assert len(monitored) == 1 and 'test' not in monitored[0]
    final = [line for label, line in lines.items() if label.startswith('test NLL')]
    assert len(final) == 1 and list(final[0].get_ydata()) == [records[-1]['test']['nll_nats']]


def test_the_logged_rate_is_the_one_the_step_used_and_the_budget_counts_every_resume(tmp_path):
    common = ['--preset', 'vdvae_digits', '--no-progress', '--override', 'log_every=1', 'eval_every=1000',
              'final_eval_samples=2', 'keep_checkpoints=100']
    train_module.main(common + ['--max-steps', '3', '--out', str(tmp_path / 'run')])
    steps = {r['step']: r['lr'] for r in Run.open(tmp_path / 'run').metrics() if 'loss' in r}
    # a linear warm-up over 100 steps: step k + 1 is taken at 2e-3 (1/100 + (1 - 1/100) k / 100), so step 1 at
    # 2e-5, not at step 2's rate
    warm = lambda k: 2e-3 * (0.01 + 0.99 * k / 100)
    assert steps[1] == pytest.approx(warm(0)) and steps[2] == pytest.approx(warm(1))
    # a budget of 3 s: the first run uses it; resumed with more steps, the run stops again at once
    budget = common + ['--override', 'max_minutes=0.05', '--max-steps', '100000', '--save-every', '100000']
    train_module.main(budget + ['--out', str(tmp_path / 'timed')])
    first = max(r['step'] for r in Run.open(tmp_path / 'timed').metrics() if 'loss' in r)
    state = Run.train_state(Run(tmp_path / 'timed').checkpoints()[-1])
    assert state['seconds'] > 3 and state['step'] == first
    train_module.main(['--resume', str(tmp_path / 'timed'), '--max-steps', '200000', '--no-progress'])
    resumed = max(r['step'] for r in Run.open(tmp_path / 'timed').metrics() if 'loss' in r)
    assert resumed == first + 1, (first, resumed)            # one step, then the budget, counted in all, is spent


def test_batch_norms_are_synchronised_across_processes_when_asked():
    preset = apply_overrides(get_preset('lvae_digits'), {'sync_batch_norm': '1'})
    kinds = lambda model: {type(m).__name__ for m in model.modules() if 'BatchNorm' in type(m).__name__}
    assert kinds(build_model(preset, num_processes=2)) == {'SyncBatchNorm'}
    assert kinds(build_model(preset, num_processes=1)) == {'BatchNorm1d'}      # one process: nothing to sync


def test_two_processes_share_an_evaluation_and_get_one_process_number(tmp_path):
    run_dir = tmp_path / 'run'
    train_module.main(['--preset', 'vae_digits', '--max-steps', '20', '--no-progress', '--out', str(run_dir),
                       '--override', 'eval_every=1000', 'final_eval_samples=2'])
    options = ['--k', '7', '--batch-size', '30', '--no-figures', '--no-progress']
    one = subprocess.run([sys.executable, '-m', 'hvae_nb.evaluate', str(run_dir), *options], capture_output=True,
                         text=True, env=environment(), cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr
    single = Run.open(run_dir).evaluations()['test_k7_batch30']
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port',
              '29531', '-m', 'hvae_nb.evaluate', str(run_dir), *options]
    two = subprocess.run(launch, capture_output=True, text=True, env=environment(ACCELERATE_USE_CPU='1'), cwd=ROOT,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    shared = Run.open(run_dir).evaluations()['test_k7_batch30']
    assert shared['processes'] == 2 and single['processes'] == 1
    assert shared['nll_nats'] == single['nll_nats'] and shared['kl_per_group_nats'] == single['kl_per_group_nats']
    assert two.stdout.count('test NLL') == 1                  # the main process reports


def test_mfu_divides_by_a_peak_measured_in_the_run_precision(monkeypatch):
    from hvae_nb import bench
    asked = []
    monkeypatch.setattr(bench, 'matmul_peak_flops', lambda device, dtype=torch.float32, **k: asked.append(dtype) or 1e12)
    for precision, dtype in (('no', torch.float32), ('bf16', torch.bfloat16)):
        result = bench.benchmark_preset(get_preset('vae_digits'), batch_size=8, steps=1, repeats=1, warmup=1,
                                        budget_s=0.2, mixed_precision=precision)
        assert asked[-1] == dtype and result['peak_dtype'] == str(dtype).replace('torch.', '')
        assert result['mfu'] == pytest.approx(result['achieved_flops_per_s'] / 1e12)


def test_a_diverging_run_rolls_back_to_its_last_checkpoint_at_a_lower_rate(tmp_path, monkeypatch, capsys):
    "Three non-finite updates in a row (injected at steps 13-15): back to step 10's checkpoint, half the rate."
    calls = []
    original = train_module.train_step
    def diverging(model, optimizer, micro_batches, prepare, step, *args):
        calls.append(step)
        hooks = []
        if step >= 12 and len([s for s in calls if s >= 12]) <= 3:        # the first three times past step 12
            hooks = [p.register_hook(lambda g: g * float('nan')) for p in model.parameters()]
        try: return original(model, optimizer, micro_batches, prepare, step, *args)
        finally:
            for h in hooks: h.remove()
    monkeypatch.setattr(train_module, 'train_step', diverging)
    train_module.main(['--preset', 'vae_digits', '--max-steps', '30', '--save-every', '10', '--no-progress',
                       '--out', str(tmp_path / 'run'), '--override', 'log_every=1', 'eval_every=1000',
                       'final_eval_samples=2', 'rollback_after=3', 'lr_warmup_steps=0', 'min_lr_ratio=1'])
    assert 'back to checkpoint_00000010, learning rate x 0.5' in capsys.readouterr().err
    records = Run.open(tmp_path / 'run').metrics()
    rollbacks = [r for r in records if 'rollback' in r]
    assert rollbacks == [dict(step=10, rollback=dict(from_step=15, lr_scale=0.5, consecutive_skipped=3))]
    steps = {r['step']: r for r in records if 'loss' in r}
    assert sorted(steps) == list(range(1, 31))                     # the failed steps were done again
    assert steps[10]['lr'] == pytest.approx(2e-3) and steps[11]['lr'] == pytest.approx(1e-3)   # a constant rate, halved
    assert not any(steps[s]['skipped_update'] for s in range(11, 31))
    assert math.isfinite(records[-1]['test']['nll_nats'])
    assert calls[:16] == list(range(15)) + [10]                   # step 15's failure sends it back to step 10


@pytest.mark.parametrize('name', ['vdvae_digits', 'nvae_digits'])
def test_activation_checkpointing_keeps_loss_and_gradients_and_saves_memory(name):
    "Against the same step without recomputation: loss, gradients and every buffer (NVAE's batch-norm statistics)."

    from hvae_nb.vae import checkpoint_activations
    x = torch.bernoulli(torch.full((16, 1, 8, 8), 0.3))
    results = {}
    for every in (0, 1, 3):
        torch.manual_seed(0)
        model = get_preset(name).model.build()
        blocks = checkpoint_activations(model, every)
        kept = []                                  # bytes of every tensor the forward keeps for the backward
        def pack(t): kept.append(t.numel() * t.element_size()); return t
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): out = model(x)
        out.objective.backward()
        results[every] = (out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept),
                          blocks, {n: b.clone() for n, b in model.named_buffers()})
    loss, gradients, memory, _, buffers = results[0]
    for every in (1, 3):
        assert results[every][0] == loss
        assert all(torch.allclose(results[every][1][n], g, atol=1e-7) for n, g in gradients.items())
        assert all(torch.equal(results[every][4][n], b) for n, b in buffers.items()), name   # a batch counted once
    assert results[1][3] > results[3][3] > 0 and results[0][3] == 0
    assert results[1][2] < results[3][2] < memory          # fewer activations kept, the more blocks recompute


def test_a_mixed_precision_run_scores_its_bound_and_its_elbo_in_one_precision():
    "Accelerate wraps a prepared model's forward in autocast: the evaluation must not go through it for one term only."
    from hvae_nb.vae import score_images
    torch.manual_seed(0)
    model = get_preset('lvae_digits').model.build().eval()
    reference = get_preset('lvae_digits').model.build().eval()
    reference.load_state_dict(model.state_dict())
    prepared = Accelerator(cpu=True, mixed_precision='bf16').prepare(model)   # forward now runs under bf16 autocast
    images = load_data('digits').test[0:40].round()
    wrapped = score_images(prepared, images, num_samples=3, batch_size=20)
    plain = score_images(reference, images, num_samples=3, batch_size=20)
    for key in ('nll', 'reconstruction', 'kl'):
        assert torch.equal(wrapped[key], plain[key]), key
