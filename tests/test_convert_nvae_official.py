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
from hvae_nb.runs import RunError, from_pretrained  # noqa: E402

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
