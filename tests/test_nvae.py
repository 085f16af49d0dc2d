"""Fast checks of NVAE (chapter 08) and its converter (chapter 14): the paper presets' parameter counts against the
official model's (recorded from the official code in tests/data/nvae_official.json.gz), KL balancing against a loop
written from the official definition, the penalty, training through the command line, the refactor into groups
against values recorded before it, and the conversion of official-format checkpoints."""
import argparse, gzip, json, os, subprocess, sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

# Test the working tree even when the package is not pip-installed.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvae_nb.convert import (convert_nvae, nvae_config, nvae_preset, nvae_state_dict,  # noqa: E402
                             official_flags)
from hvae_nb.nvae import NVAEConfig, groups_per_scale, kl_balance_sizes  # noqa: E402
from hvae_nb.configs import preset_from_dict  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.runs import Run, RunError, from_pretrained  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from hvae_nb.configs import ConfigError  # noqa: E402
from hvae_nb.vae import kl_warmup  # noqa: E402

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


with gzip.open(ROOT / 'tests' / 'data' / 'nvae_official.json.gz', 'rt') as f: FIXTURE = json.load(f)


@pytest.mark.parametrize('name, configuration, expected', [('nvae_mnist', 'mnist', 33_363_134),
                                                           ('nvae_cifar10', 'cifar10', 130_852_480)])
def test_paper_presets_have_the_official_parameter_count(name, configuration, expected):
    official = FIXTURE['configurations'][configuration]          # recorded from the official AutoEncoder
    assert official['parameters'] == expected
    with torch.device('meta'): model = get_preset(name).model.build()
    assert sum(p.numel() for p in model.parameters()) == expected
    # and every official tensor, buffers included, has its place in our model with its shape
    meta = {}
    for key, shape in official['state']:                           # an alias is its weight
        alias = key.endswith('.weight_normalized')
        meta[key] = meta[key.removesuffix('_normalized')] if alias else torch.empty(shape, device='meta')
    state = nvae_state_dict(meta, model, name)
    assert len(state) == len(model.state_dict())


def test_groups_per_scale_and_balance_sizes():
    assert groups_per_scale(2, 10) == [10, 5] and groups_per_scale(3, 8, minimum=3) == [8, 4, 3]
    assert kl_balance_sizes([10, 5]).tolist() == [2.0] * 10 + [1.0] * 5


def balancing_weights_by_hand(kl_top_down: list[list[float]], groups_top_down: list[int]) -> list[float]:
    """NVAE's KL balancing coefficients, one number at a time, as the official utils.py defines them:
    kl_balancer_coeff(fun='square') gives every group of scale s (from the top) (2^s)^2 / (groups at s), divided by
    the smallest; kl_balancer weights group i by (mean_b |KL_bi| + 0.01) / alpha_i * (their sum over groups),
    normalised to mean 1."""
    alpha = []
    for s, n in enumerate(groups_top_down): alpha += [(2 ** s) ** 2 / n] * n
    alpha = [a / min(alpha) for a in alpha]
    batch, groups = len(kl_top_down), len(alpha)
    coeff = [sum(abs(kl_top_down[b][i]) for b in range(batch)) / batch + 0.01 for i in range(groups)]
    total = sum(coeff)
    coeff = [c / a * total for c, a in zip(coeff, alpha)]
    mean = sum(coeff) / groups
    return [c / mean for c in coeff]


def test_kl_balancing_weights():
    torch.manual_seed(0)
    kl = torch.rand(16, 6) * torch.tensor([0.0, 0.1, 1.0, 5.0, 10.0, 20.0]) - 0.05   # bottom -> top; some < 0
    model = SMALL.build()                           # 4 groups at the finer scale, 2 at the top one
    weights = model.kl_weights(kl, beta=0.5)
    expected = balancing_weights_by_hand(kl.flip(1).tolist(), [2, 4])[::-1]    # the official order is top-down
    assert torch.allclose(weights, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert model.kl_weights(kl, beta=1.0) is None
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
    """A checkpoint as NVlabs/NVAE's train.py saves one (a dict with state_dict, args as a Namespace, ...) for the
    small command, its keys and shapes those the official code gave (the fixture), aliases included; random values."""
    assert nvae_config(command, 'test') == nvae_config(FIXTURE['small']['args'], 'fixture')
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in FIXTURE['small']['state']:
        if key.endswith('.weight_normalized'): state[key] = state[key.removesuffix('_normalized')]
        elif key.endswith('num_batches_tracked'): state[key] = torch.tensor(7)
        elif key.endswith('running_var'): state[key] = torch.rand(shape, generator=generator) + 0.5
        else: state[key] = 0.1 * torch.randn(shape, generator=generator)
    state.update(changes)
    torch.save({'epoch': 10, 'state_dict': {k: v for k, v in state.items() if v is not None},
                'args': argparse.Namespace(**command), 'optimizer': {'state': {}, 'param_groups': []},
                'global_step': 100, 'arch_instance': {'normal_enc': ['res_bnswish', 'res_bnswish']},
                'scheduler': {'last_epoch': 4}, 'grad_scalar': {'scale': 1024.0}}, path)
    return state


SMALL_COMMAND = dict(MNIST_COMMAND, num_channels_enc=8, num_channels_dec=12, num_latent_per_group=4,
                     num_groups_per_scale=4, num_preprocess_blocks=1, num_preprocess_cells=2,
                     num_postprocess_blocks=1, num_postprocess_cells=2, num_nf=1)


def test_converted_small_model_runs(tmp_path):
    "Where each tensor lands is checked against the official code's output in test_convert_nvae_official.py."
    official_checkpoint(tmp_path / 'small.pt', SMALL_COMMAND)
    config = nvae_config(SMALL_COMMAND, 'small')
    assert official_flags(config)['num_channels_dec'] == 12
    preset = replace(get_preset('nvae_mnist'), name='nvae_small', model=config)
    model = from_pretrained(convert_nvae(tmp_path / 'small.pt', preset, tmp_path / 'run'))
    with torch.no_grad(): assert torch.isfinite(model.log_weight(torch.bernoulli(torch.full((3, 1, 28, 28), 0.2)))).all()


# Recorded before NVAE's layers became one module per group (commit 9a73bd4, 2026-12-07): the stored nvae_mnist_hour
# run, its first four test images of the fixed binarised MNIST, z the posterior means.
HOUR_LOG_PX = [-50.57786178588867, -44.73915100097656, -46.42649841308594, -71.96747589111328]
HOUR_KL = [18.13606071472168, 17.407766342163086, 18.419387817382812, 25.37598991394043]


def test_weights_saved_before_the_groups_load_and_give_the_same_numbers():
    run = ROOT / 'results' / 'nvae_mnist_hour'
    model = Run.open(run).preset.model.build()
    model.load_state_dict(load_file(run / 'model.safetensors'))        # keys of the parallel lists, renamed
    model.eval()
    x = torch.from_numpy(np.load(ROOT / 'tests' / 'data' / 'binarized_mnist_test_4.npy')).float()
    with torch.no_grad():
        walk = model.posterior_walk(x, use_mean=True)
        log_px = model.likelihood.log_prob(walk.params, x)
        kl = torch.stack([g.terms()[0] for g in walk.groups], 1).sum(1)
    torch.testing.assert_close(log_px, torch.tensor(HOUR_LOG_PX), rtol=0, atol=1e-4)
    torch.testing.assert_close(kl, torch.tensor(HOUR_KL), rtol=0, atol=1e-4)


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


def _official_preview_sampler(logits, means, log_scales, coefficients, t, generator):
    """NVlabs/NVAE's DiscMixLogistic.sample(t) as its train.py draws previews, written here from reading it: a
    Gumbel-max choice on logits / t, logistic noise at scale exp(log_scale) / t, each channel clamped to [-1, 1]
    and shifted by the earlier ones, then mapped to [0, 1] (unrounded). Shapes: logits (B, M), the rest (B, M, 3)."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-5, 1 - 1e-5)
    chosen = (logits / t - torch.log(-torch.log(u))).argmax(1)
    pick = lambda v: v[torch.arange(len(v)), chosen]                      # (B, 3)
    mean, log_scale, alpha = pick(means), pick(log_scales), pick(coefficients)
    u = torch.rand(mean.shape, generator=generator).clamp(1e-5, 1 - 1e-5)
    x = mean + torch.exp(log_scale) / t * (torch.log(u) - torch.log(1 - u))
    r = x[:, 0].clamp(-1, 1)
    g = (x[:, 1] + alpha[:, 0] * r).clamp(-1, 1)
    b = (x[:, 2] + alpha[:, 1] * r + alpha[:, 2] * g).clamp(-1, 1)
    return (torch.stack([r, g, b], 1) + 1) / 2


@pytest.mark.parametrize('t', [1.0, 0.6])
def test_the_mixture_samples_at_a_temperature_as_nvaes_previews(t):
    "Each colour channel's distribution against the official preview sampler's (two-sample KS, 20,000 draws)."
    from scipy.stats import ks_2samp
    from hvae_nb.nvae import NVAELogisticMixture
    mixture, m, n = NVAELogisticMixture(3), 3, 20_000
    logits = torch.tensor([0.5, -0.3, 0.2])
    means = torch.tensor([[-0.5, 0.1, 0.3], [0.2, -0.2, 0.0], [0.6, 0.4, -0.4]])      # component, channel
    log_scales = torch.tensor([[-2.0, -1.8, -2.2], [-1.9, -2.1, -2.0], [-2.0, -2.0, -1.7]])
    raw_couplings = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.3], [-0.2, 0.1, 0.2]])
    # NVAE's layout: M logits, then per channel M means, M log-scales, M couplings (pre-tanh)
    per_channel = torch.stack([means.T, log_scales.T, raw_couplings.T], 1)              # channel, kind, M
    params = torch.cat([logits, per_channel.flatten()]).view(1, -1, 1, 1).expand(n, -1, 1, 1)
    torch.manual_seed(0)
    ours = mixture.sample(params, temperature=t).view(n, 3)
    expand = lambda v: v.expand(n, *v.shape)
    theirs = _official_preview_sampler(expand(logits), expand(means), expand(log_scales),
                                       expand(torch.tanh(raw_couplings)), t, torch.Generator().manual_seed(1))
    for c in range(3):
        assert ks_2samp(ours[:, c].numpy(), theirs[:, c].numpy()).pvalue > 1e-3, (t, c)
    if t != 1:   # and the temperature is seen: t = 1 draws are another distribution
        cold = _official_preview_sampler(expand(logits), expand(means), expand(log_scales),
                                         expand(torch.tanh(raw_couplings)), 1.0, torch.Generator().manual_seed(2))
        assert min(ks_2samp(ours[:, c].numpy(), cold[:, c].numpy()).pvalue for c in range(3)) < 1e-6
