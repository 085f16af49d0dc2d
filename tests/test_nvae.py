"""Fast checks of NVAE (chapter 08) and its converter (chapter 14): the paper presets' parameter counts against the
official architecture written out from the official layer definitions, KL balancing, the penalty, training through
the command line, and the conversion of official-shaped checkpoints."""
import argparse, math, os, subprocess, sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Test the working tree even when the package is not pip-installed.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvae_nb.convert import (convert_nvae, nvae_config, nvae_module_names, nvae_preset,  # noqa: E402
                             nvae_state_dict, official_flags)
from hvae_nb.nvae import (NVAEConfig, groups_per_scale, kl_balance_sizes, kl_balance_weights,  # noqa: E402
                          official_nvae_state)
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.runs import RunError, from_pretrained  # noqa: E402
from hvae_nb.vae import ConfigError, kl_warmup  # noqa: E402

# The official README commands, as the flags train.py's argparse gives the model (defaults filled in).
MNIST_COMMAND = dict(dataset='mnist', arch_instance='res_mbconv', use_se=True, res_dist=True, num_x_bits=8,
                     num_latent_scales=2, num_groups_per_scale=10, ada_groups=True, min_groups_per_scale=1,
                     num_latent_per_group=20, num_channels_enc=32, num_channels_dec=32, num_preprocess_blocks=2,
                     num_preprocess_cells=3, num_postprocess_blocks=2, num_postprocess_cells=3,
                     num_cell_per_cond_enc=2, num_cell_per_cond_dec=2, num_nf=0, num_mixture_dec=10,
                     weight_decay_norm=1e-2, weight_decay_norm_init=10.0, weight_decay_norm_anneal=False)
CIFAR10_COMMAND = dict(MNIST_COMMAND, dataset='cifar10', num_latent_scales=1, num_groups_per_scale=30,
                       ada_groups=False, num_channels_enc=128, num_channels_dec=128, num_preprocess_blocks=1,
                       num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2, num_nf=1)
SMALL = NVAEConfig(image_shape=(1, 8, 8), padding=0, encoder_channels=8, decoder_channels=8, latent_channels=4,
                   latent_scales=2, groups_per_scale=4, preprocess_blocks=1, preprocess_cells=1,
                   postprocess_blocks=1, postprocess_cells=1, encoder_cells_per_group=1, decoder_cells_per_group=1)


def count(entries) -> int: return sum(math.prod(shape) for _, shape in entries)


@pytest.mark.parametrize('name, command, expected', [('nvae_mnist', MNIST_COMMAND, 33_363_134),
                                                     ('nvae_cifar10', CIFAR10_COMMAND, 130_852_480)])
def test_paper_presets_have_the_official_parameter_count(name, command, expected):
    official = official_nvae_state(command, buffers=False)
    assert count(official) == expected
    with torch.device('meta'): model = get_preset(name).model.build()
    assert sum(p.numel() for p in model.parameters()) == expected
    # and every official tensor, buffers included, has its place in our model with its shape
    state = nvae_state_dict({k: torch.empty(s, device='meta') for k, s in official_nvae_state(command)}, model, name)
    assert len(state) == len(model.state_dict())


def test_groups_per_scale_and_balance_sizes():
    assert groups_per_scale(2, 10) == [10, 5] and groups_per_scale(3, 8, minimum=3) == [8, 4, 3]
    assert kl_balance_sizes([10, 5]).tolist() == [2.0] * 10 + [1.0] * 5


def test_kl_balancing_weights():
    torch.manual_seed(0)
    kl = torch.rand(16, 6) * torch.tensor([0.0, 0.1, 1.0, 5.0, 10.0, 20.0])
    sizes = kl_balance_sizes([4, 2])
    weights = kl_balance_weights(kl, sizes)
    expected = (kl.abs().mean(0) + 0.01) / sizes
    assert torch.allclose(weights, expected / expected.mean())
    assert abs(weights.mean().item() - 1) < 1e-6 and weights.argmin() == 0
    model = SMALL.build()
    assert model.kl_weights(kl, beta=1.0) is None and torch.equal(model.kl_weights(kl, beta=0.5), weights)
    assert replace(SMALL, kl_balancing=0).build().kl_weights(kl, beta=0.5) is None


def test_penalty_only_in_training_and_annealed():
    model = replace(SMALL, spectral_weight=1e-2, spectral_weight_start=1.0).build().train()
    assert abs(model.penalty(0.0).item() / model.penalty(1.0).item() - 100) < 1
    assert model.eval().penalty(0.5) == 0.0 and SMALL.build().train().penalty(0.5) == 0.0


def test_nvae_warmup_is_the_official_kl_coeff():
    total = 60_000
    for step in (0, 5, 6, 7, 9_000, 18_006, 18_007, 59_999):
        official = max(min((step - 1e-4 * total) / (0.3 * total), 1.0), 1e-4)
        assert abs(kl_warmup(step, round(0.3 * total), 1e-4, round(1e-4 * total)) - official) < 1e-12


def test_nvae_digits_trains_from_the_command_line(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-m', 'hvae_nb.train', '--preset', 'nvae_digits', '--max-steps', '5',
                           '--override', 'train.final_eval_samples=2', '--override', 'train.eval_examples=20',
                           '--out', str(tmp_path / 'run'), '--no-progress'],
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'nvae_digits: test NLL' in done.stdout
    model = from_pretrained(tmp_path / 'run')
    assert model.num_groups == 6 and model.sample(2).shape == (2, 1, 8, 8)


def official_checkpoint(path, command: dict, seed: int = 0, **changes) -> dict:
    "A checkpoint shaped like one NVlabs/NVAE's train.py saves: a dict with state_dict, args (a Namespace), ..."
    generator = torch.Generator().manual_seed(seed)
    state = {key: (torch.tensor(7) if key.endswith('num_batches_tracked')
                   else torch.rand(shape, generator=generator) + 0.5 if key.endswith('running_var')
                   else 0.1 * torch.randn(shape, generator=generator))
             for key, shape in official_nvae_state(command)}
    for key, tensor in list(state.items()):      # the official Conv2D's alias of a plain conv
        module, _, last = key.rpartition('.')
        plain = last == 'weight' and tensor.dim() == 4 and f'{module}.log_weight_norm' not in state
        if plain: state[f'{module}.weight_normalized'] = tensor
    state.update(changes)
    torch.save({'epoch': 10, 'state_dict': {k: v for k, v in state.items() if v is not None},
                'args': argparse.Namespace(**command), 'optimizer': {'state': {}, 'param_groups': []},
                'global_step': 100, 'arch_instance': {'normal_enc': ['res_bnswish', 'res_bnswish']},
                'scheduler': {'last_epoch': 4}, 'grad_scalar': {'scale': 1024.0}}, path)
    return state


SMALL_COMMAND = dict(MNIST_COMMAND, num_channels_enc=8, num_channels_dec=12, num_latent_per_group=4,
                     num_groups_per_scale=4, num_preprocess_blocks=1, num_preprocess_cells=2,
                     num_postprocess_blocks=1, num_postprocess_cells=2, num_nf=1)


def test_converter_places_every_official_tensor(tmp_path):
    state = official_checkpoint(tmp_path / 'small.pt', SMALL_COMMAND)
    state = {k: v for k, v in state.items() if not k.endswith('.weight_normalized')}
    config = nvae_config(SMALL_COMMAND, 'small')
    assert official_flags(config)['num_channels_dec'] == 12
    preset = replace(get_preset('nvae_mnist'), name='nvae_small', model=config)
    model = from_pretrained(convert_nvae(tmp_path / 'small.pt', preset, tmp_path / 'run'))
    loaded = model.state_dict()
    placed = 0
    for mine, theirs in [('top_features', 'prior_ftr0')] + nvae_module_names(config):
        ours = [n for n in loaded if n == mine or n.startswith(mine + '.')]
        official = [k for k in state if k == theirs or k.startswith(theirs + '.')]
        assert len(ours) == len(official), (mine, theirs)
        for name, key in zip(ours, official):
            assert torch.equal(loaded[name], state[key]), (name, key)   # same shape too
            placed += 1
    assert placed == len(state)
    with torch.no_grad(): assert torch.isfinite(model.log_weight(torch.bernoulli(torch.full((3, 1, 28, 28), 0.2)))).all()


def test_converter_infers_the_presets_and_refuses_what_it_does_not_know(tmp_path):
    for name, command in (('nvae_mnist', MNIST_COMMAND), ('nvae_cifar10', CIFAR10_COMMAND)):
        assert nvae_preset(nvae_config(command, name), name).name == name
    refusals = ((dict(MNIST_COMMAND, dataset='lsun_church_64'), "--dataset 'lsun_church_64'"),
                (dict(MNIST_COMMAND, arch_instance='mbconv_sep'), "--arch_instance 'mbconv_sep'"),
                (dict(MNIST_COMMAND, res_dist=False), 'residual posterior'),
                (dict(MNIST_COMMAND, num_channels_enc=64), 'no preset has'))
    for i, (command, message) in enumerate(refusals):
        torch.save({'state_dict': {'prior_ftr0': torch.zeros(1)}, 'args': argparse.Namespace(**command)},
                   tmp_path / f'{i}.pt')
        with pytest.raises(ConfigError, match=None) as refused:
            convert_nvae(tmp_path / f'{i}.pt', None, tmp_path / f'run{i}')
        assert message in str(refused.value) and '\n' not in str(refused.value)
    preset = replace(get_preset('nvae_mnist'), model=nvae_config(SMALL_COMMAND, 'small'))
    alias = 'dec_tower.1._ops.0.conv.1.conv.0.weight_normalized'
    for changes, message in (({'enc0.1.bias': None}, "'enc0.1.bias' is missing"),
                             ({alias: torch.zeros(288, 48, 1, 1)}, f"{alias!r} differs from"),
                             ({'stem.weight': torch.zeros(8, 1, 1, 1)}, 'has shape (8, 1, 1, 1)')):
        official_checkpoint(tmp_path / 'damaged.pt', SMALL_COMMAND, **changes)
        with pytest.raises(RunError) as refused: convert_nvae(tmp_path / 'damaged.pt', preset, tmp_path / 'damaged')
        assert message in str(refused.value)


def test_convert_command_line(tmp_path):
    official_checkpoint(tmp_path / 'small.pt', SMALL_COMMAND)
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-m', 'hvae_nb.convert', 'nvae', str(tmp_path / 'small.pt'),
                           '--out', str(tmp_path / 'run')], capture_output=True, text=True, env=environment,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.count('\n') == 1 and 'no preset has' in done.stderr
