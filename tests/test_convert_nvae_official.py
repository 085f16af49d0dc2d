"""The NVAE converter and presets against the official code's own layout and output.

tests/data/nvae_official.json.gz was written once by

    python tools/compare_nvae_official.py --official PATH/TO/NVlabs/NVAE --parts fixture

from the official `AutoEncoder` (NVlabs/NVAE at the commit it records), built for every command of the official README
(their flags parsed by the official train.py's parser): the state_dict's key names and shapes, in order and with the
aliases `….weight_normalized` the official `Conv2D` adds, and the parameter count. For a small MNIST model with flows
it also holds the official model's output (log p(x|z) and the KL of every group, z the posterior means, evaluation
mode) on weights and images drawn by a fixed recipe (the tool's `fixture_tensors` and `fixture_images`). Nothing here
derives the official names from the library's own list: the key sets come from running the official code."""
import argparse, gzip, json, math, sys

import numpy as np
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tools'))

from compare_nvae_official import PRESETS, fixture_images, fixture_tensors  # noqa: E402
from hvae_nb.convert import (NVAE_DATASETS, convert_nvae, nvae_config, nvae_preset,  # noqa: E402
                             nvae_state_dict, read_nvae_checkpoint)
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.runs import Run, RunError, from_pretrained  # noqa: E402

with gzip.open(ROOT / 'tests' / 'data' / 'nvae_official.json.gz', 'rt') as f: FIXTURE = json.load(f)
CONFIGURATIONS = FIXTURE['configurations']
CONVERTED = list(CONFIGURATIONS)     # every README configuration has its preset


def save_as_train_py(path, args: dict, state: dict):
    "A checkpoint in the dictionary train.py saves, `args` an argparse.Namespace."
    torch.save({'epoch': 400, 'state_dict': state, 'optimizer': {'state': {}, 'param_groups': []},
                'global_step': 60_000, 'args': argparse.Namespace(**args),
                'arch_instance': {'normal_enc': ['res_bnswish', 'res_bnswish']},
                'scheduler': {'last_epoch': 394}, 'grad_scalar': {'scale': 1024.0}}, path)


def numbered_state(layout) -> dict:
    """Every official tensor filled with its own number (an alias with its weight's), each a view of
    one number (stride 0), so that a checkpoint of 330 million parameters takes a few kilobytes."""
    state, number = {}, 0
    for key, shape in layout:
        if key.endswith('.weight_normalized'):
            state[key] = state[key.removesuffix('_normalized')]; continue
        number += 1
        if key.endswith('num_batches_tracked'): state[key] = torch.tensor(number)
        else: state[key] = torch.tensor(float(number)).expand(shape)
    return state


@pytest.mark.parametrize('name', CONVERTED)
def test_preset_has_the_official_parameter_count(name):
    with torch.device('meta'): model = get_preset(PRESETS[name]).model.build()
    assert sum(p.numel() for p in model.parameters()) == CONFIGURATIONS[name]['parameters']


@pytest.mark.parametrize('name', CONVERTED)
def test_convert_accepts_the_official_checkpoint_and_infers_the_preset(name, tmp_path):
    entry = CONFIGURATIONS[name]
    state = numbered_state(entry['state'])
    save_as_train_py(tmp_path / 'checkpoint.pt', entry['args'], state)
    official, args = read_nvae_checkpoint(tmp_path / 'checkpoint.pt')
    assert len(official) == len(entry['state']) and args == entry['args']
    preset = nvae_preset(nvae_config(args, name), name, NVAE_DATASETS[name][0])
    assert preset.name == PRESETS[name]
    with torch.device('meta'): model = preset.model.build()
    placed = nvae_state_dict(official, model, name)
    ours = {k: v for k, v in placed.items() if not k.startswith('spectral.')}
    # every official tensor (aliases aside) lands in exactly one of ours, and ours get nothing else
    numbers = sorted(int(v[(0,) * v.dim()]) for v in ours.values())     # without a copy
    assert numbers == list(range(1, len(ours) + 1))
    assert len(ours) == sum(not k.endswith('.weight_normalized') for k, _ in entry['state'])


def test_convert_refuses_an_alias_that_is_not_its_weight(tmp_path):
    entry = CONFIGURATIONS['mnist']
    state = numbered_state(entry['state'])
    alias = next(k for k in state if k.endswith('.weight_normalized'))
    state[alias] = state[alias] + 1
    save_as_train_py(tmp_path / 'checkpoint.pt', entry['args'], state)
    official, args = read_nvae_checkpoint(tmp_path / 'checkpoint.pt')
    with torch.device('meta'): model = get_preset('nvae_mnist').model.build()
    with pytest.raises(RunError, match=f"key '{alias}' differs from"):
        nvae_state_dict(official, model, 'checkpoint')


def test_converted_model_gives_the_official_output(tmp_path):
    """The small official model's output, recorded from the official code on fixed weights and
    images, from our model converted from those weights: every tensor sits where the official one
    was, or the numbers differ."""
    small = FIXTURE['small']
    state = fixture_tensors(small['state'], small['seed'])
    save_as_train_py(tmp_path / 'small.pt', small['args'], state)
    config = nvae_config(small['args'], 'small')
    preset = replace(get_preset('nvae_mnist'), name='nvae_small', model=config)
    model = from_pretrained(convert_nvae(tmp_path / 'small.pt', preset, tmp_path / 'run')).eval()
    x = fixture_images(small['seed'])
    with torch.no_grad():
        walk = model.posterior_walk(x, use_mean=True)
        log_px = model.likelihood.log_prob(walk.params, x)
        kl = torch.stack([g.terms()[0] for g in walk.groups[::-1]], 1)     # top-down, as recorded
    assert sum(p.numel() for p in model.parameters()) == small['parameters']
    torch.testing.assert_close(log_px, torch.tensor(small['log_px']), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(kl, torch.tensor(small['kl']), rtol=1e-5, atol=1e-3)
    # and a tensor out of place is seen: two decoder cells' batch-norm scales swapped
    swapped = dict(state)
    a, b = 'dec_tower.1._ops.0.conv.0.bn.weight', 'dec_tower.2._ops.0.conv.0.bn.weight'
    swapped[a], swapped[b] = state[b], state[a]
    save_as_train_py(tmp_path / 'swapped.pt', small['args'], swapped)
    wrong = from_pretrained(convert_nvae(tmp_path / 'swapped.pt', preset, tmp_path / 'w')).eval()
    with torch.no_grad():
        walk = wrong.posterior_walk(x, use_mean=True)
        assert not torch.allclose(wrong.likelihood.log_prob(walk.params, x),
                                  torch.tensor(small['log_px']), rtol=1e-5, atol=1e-3)


def test_a_converted_nvae_run_names_nvidias_licence(tmp_path, capsys):
    "The official NVAE weights are non-commercial: the converted run keeps that, and says so."
    from hvae_nb.convert import main
    from hvae_nb.runs import Run
    small = FIXTURE['small']
    save_as_train_py(tmp_path / 'small.pt', small['args'], fixture_tensors(small['state'], small['seed']))
    config = nvae_config(small['args'], 'small')
    run_dir = convert_nvae(tmp_path / 'small.pt',
                           replace(get_preset('nvae_mnist'), name='nvae_small', model=config), tmp_path / 'run')
    assert 'NVIDIA Source Code License: non-commercial' in Run.open(run_dir).config['launch']['licence']
    entry = CONFIGURATIONS['mnist']     # from the command line, the preset inferred
    save_as_train_py(tmp_path / 'mnist.pt', entry['args'], numbered_state(entry['state']))
    main(['nvae', str(tmp_path / 'mnist.pt'), '--out', str(tmp_path / 'cli')])
    assert "licence: NVIDIA Source Code License: non-commercial use only" in capsys.readouterr().out


# each README configuration at a width a CPU converts and evaluates in seconds: the official flags, narrowed
NARROW_FLAGS = {'num_channels_enc': 4, 'num_channels_dec': 4, 'num_latent_per_group': 2, 'num_groups_per_scale': 2}
NARROW_OVERRIDES = ['model.encoder_channels=4', 'model.decoder_channels=4', 'model.latent_channels=2',
                    'model.groups_per_scale=2']


def _data_for(dataset: str, data_dir: Path):
    "A few images of `dataset` in its on-disk format, drawn here (MNIST: the real files, when $HVAE_DATA has them)."
    import os, subprocess
    from PIL import Image
    from test_data import fake_cifar, write_cifar_folder
    from test_data_memory import sparse_images
    rng = np.random.default_rng(0)
    def draw(folder: Path, count: int, size: tuple, suffix: str):
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(folder / f'{i:06d}{suffix}')
    def pack(source: Path, recipe: str):
        done = subprocess.run([sys.executable, '-m', 'hvae_nb.data', 'pack', str(source), '--dataset', recipe,
                               '--data-dir', str(data_dir), '--no-progress'], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    if dataset == 'mnist':
        shared = Path(os.environ.get('HVAE_DATA', '~/.cache/hvae_nb')).expanduser() / 'mnist'
        if not shared.is_dir(): pytest.skip(f"MNIST's files are not in {shared}")
        (data_dir / 'mnist').symlink_to(shared, target_is_directory=True)
    elif dataset == 'cifar10': write_cifar_folder(data_dir, fake_cifar()[2])
    elif dataset == 'celeba64':
        draw(data_dir.parent / 'img_align_celeba', 6, (178, 218), '.jpg'); pack(data_dir.parent / 'img_align_celeba',
                                                                                   'celeba64')
    elif dataset == 'celebahq256':
        draw(data_dir.parent / 'celebahq', 6, (64, 64), '.png'); pack(data_dir.parent / 'celebahq', 'celebahq256')
    elif dataset == 'imagenet32':     # openai/vdvae's arrays: a sparse file stands in for the 1.28 million images
        sparse_images(data_dir / 'imagenet32' / 'imagenet32-train.npy', 5_010, side=32)
        sparse_images(data_dir / 'imagenet32' / 'imagenet32-valid.npy', 4, side=32)
    elif dataset == 'ffhq256': sparse_images(data_dir / 'ffhq256' / 'ffhq-256.npy', 7_010, side=256)
    else: raise AssertionError(dataset)


@pytest.mark.parametrize('name', CONVERTED)
def test_each_configuration_converts_then_evaluates_and_samples(name, tmp_path):
    """A train.py checkpoint of each README command (narrowed) through the command lines a user runs: convert with its
    preset, then evaluate on its dataset's files, with samples."""
    import subprocess
    from hvae_nb.nvae import official_layout
    args = {**CONFIGURATIONS[name]['args'], **NARROW_FLAGS}
    torch.manual_seed(0)
    model = nvae_config(args, name).build()
    ours = model.state_dict()
    save_as_train_py(tmp_path / 'checkpoint.pt', args, {official: ours[key] for official, key in official_layout(model)})
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    _data_for(NVAE_DATASETS[name][0], data_dir)
    run = lambda *command: subprocess.run([sys.executable, '-m', *command], capture_output=True, text=True,
                                          cwd=ROOT, timeout=600)
    converted = run('hvae_nb.convert', 'nvae', str(tmp_path / 'checkpoint.pt'), '--preset', PRESETS[name],
                    '--out', str(tmp_path / 'run'), '--override', *NARROW_OVERRIDES)
    assert converted.returncode == 0, converted.stderr
    evaluated = run('hvae_nb.evaluate', str(tmp_path / 'run'), '--k', '2', '--max-examples', '2', '--batch-size', '2',
                    '--data-dir', str(data_dir), '--no-progress', '--no-figures')
    assert evaluated.returncode == 0, evaluated.stderr
    (only,) = Run.open(tmp_path / 'run').evaluations().values()
    assert math.isfinite(only['nll_nats']) and only['num_examples'] == min(2, only['split_size'])
    model = from_pretrained(tmp_path / 'run')
    torch.manual_seed(0)
    samples = model.sample(2, temperature=0.7)
    c, h, w = model.config.image_shape
    assert samples.shape == (2, c, h, w) and torch.isfinite(samples).all()
    assert 0 <= samples.min() and samples.max() <= 1
