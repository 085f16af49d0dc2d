"""A third model, defined here and nowhere in the package, gets training, the IW-NLL, the diagnostics, the evaluation
figures and the benchmark by implementing the interface of chapter 02 -- and nothing else. Its hooks (a KL weighting
and a penalty) and a posterior without a closed-form KL (a shift flow) go through the same trace and the same loss."""
import json, math, shutil
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from hvae_nb.distributions import DiagonalGaussian, gaussian_params, make_likelihood, sum_except_batch
from hvae_nb.configs import ConfigError, ModelConfig, Preset, TrainConfig, check_positive_ints, register_family
from hvae_nb.vae import Group, HierarchicalVAE, Walk, dataset_nll, iw_log_likelihood
from hvae_nb.diagnostics import active_units, kl_per_group
from hvae_nb.train import train
from hvae_nb.evaluate import FIGURE_NAMES, evaluate_run
from hvae_nb.bench import benchmark_preset
from hvae_nb.runs import Run, from_pretrained


@dataclass(frozen=True)
class TwoGroupConfig(ModelConfig):
    "Two Gaussian groups: z_2 (top) ~ N(0, I), z_1 | z_2 from an MLP; a shift flow on the top posterior if asked."
    bottom: int = 6
    top: int = 3
    width: int = 32
    flow: int = 0                  # 1: shift the top group's posterior sample by a function of itself
    penalty_weight: float = 0.0    # an L2 penalty on the decoder, through the penalty hook
    balance: int = 0               # 1: weight the KL per group through the KL-weighting hook
    family: ClassVar[str] = 'test_two_group'
    def validate(self):
        super().validate()
        check_positive_ints(self, 'bottom', 'top', 'width')
    def build(self): return TwoGroupVAE(self)


class TwoGroupVAE(HierarchicalVAE):
    def __init__(self, config: TwoGroupConfig):
        super().__init__()
        self.config = config
        c, h, w = config.image_shape
        self.likelihood = make_likelihood(config.likelihood, config.num_mixtures)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, config.width), nn.ELU())
        self.heads = nn.ModuleList([nn.Linear(config.width, 2 * config.bottom), nn.Linear(config.width, 2 * config.top)])
        self.prior_net = nn.Linear(config.top, 2 * config.bottom)
        self.shift = nn.Linear(config.top, config.top)
        self.decoder = nn.Sequential(nn.Linear(config.bottom, c * h * w * self.likelihood.num_params(c)),
                                     nn.Unflatten(1, (self.likelihood.num_params(c), h, w)))

    @property
    def latent_shapes(self): return [(self.config.bottom,), (self.config.top,)]

    def bottom_up(self, x): return self.encoder(x)

    def top_down(self, features, batch, keep, temperature=1.0, use_mean=False):
        top_prior = DiagonalGaussian.standard((batch, self.config.top), self.device)
        top_q = DiagonalGaussian(*gaussian_params(self.heads[1](features))) if keep >= 1 else None
        top = Group.draw(top_prior, top_q, use_mean, temperature, group=1)
        if top_q is not None and self.config.flow and not use_mean:
            # z -> z + tanh(W z): log q(z') = log q(z) - log|det J|, J = I + diag(1 - tanh^2) W
            shifted = top.z + torch.tanh(self.shift(top.z))
            jacobian = torch.eye(self.config.top) + (1 - torch.tanh(self.shift(top.z)) ** 2)[:, :, None] * self.shift.weight
            log_q = sum_except_batch(top_q.log_prob(top.z)) - torch.linalg.slogdet(jacobian)[1]
            top = Group(shifted, top_prior, top_q, log_q)
        bottom_prior = DiagonalGaussian(*gaussian_params(self.prior_net(top.z)))
        bottom_q = DiagonalGaussian(*gaussian_params(self.heads[0](features))) if keep >= 2 else None
        bottom = Group.draw(bottom_prior, bottom_q, use_mean, temperature, group=0)
        return Walk([bottom, top], self.decoder(bottom.z))

    def kl_weights(self, kl, beta):
        if not self.config.balance: return None
        return torch.tensor([2.0, 0.5])

    def penalty(self, beta):
        return self.config.penalty_weight * sum((p ** 2).sum() for p in self.decoder.parameters())


register_family(TwoGroupConfig)
TRAIN = TrainConfig(batch_size=32, lr=2e-3, max_steps=60, eval_every=30, save_every=30, eval_examples=40,
                    eval_samples=5, final_eval_samples=10, log_every=1)


def preset(**model):
    return Preset('two_group_digits', 'digits', TwoGroupConfig(image_shape=(1, 8, 8), **model), TRAIN)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """This file's own run, not the shared tiny run of tests/conftest.py: its model is the family defined here (two
    groups, a penalty through the hook), which is what the tests below check the faces against."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp('third') / 'run'
    return train(preset(penalty_weight=1e-3), out=run_dir, progress=False)


def test_training_iw_nll_and_the_run_directory(trained):
    assert trained.test['num_examples'] == 297 and math.isfinite(trained.test['nll_nats'])
    steps = [r for r in Run.open(trained.run_dir).metrics() if 'loss' in r]
    assert len(steps) == 60 and len(steps[0]['kl']) == 2
    assert all(r['penalty'] > 0 for r in steps)                                # the hook's term, logged on its own
    assert steps[-1]['loss'] < steps[0]['loss']
    reloaded = from_pretrained(trained.run_dir)                               # the family was registered
    images = torch.bernoulli(torch.rand(16, 1, 8, 8))
    torch.manual_seed(0); a = iw_log_likelihood(reloaded, images, 20)
    torch.manual_seed(0); b = iw_log_likelihood(trained.model, images, 20)
    torch.testing.assert_close(a, b)


def test_diagnostics_evaluation_figures_and_benchmark(trained, tmp_path):
    images = torch.bernoulli(torch.rand(64, 1, 8, 8))
    model = trained.model
    assert kl_per_group(model, images).shape == (2,)
    active = active_units(model, images)
    assert active.sizes == [6, 3] and model.num_groups == 2
    run_dir = shutil.copytree(trained.run_dir, tmp_path / 'run')      # the evaluation writes into the run
    result = evaluate_run(run_dir, k=10, max_examples=40, progress=False)
    assert sorted(result['figures']) == sorted(FIGURE_NAMES)
    assert len(result['kl_per_group_nats']) == 2
    assert Run.open(run_dir).evaluations()[result['name']]['nll_nats'] == result['nll_nats']
    bench = benchmark_preset(preset(), batch_size=8, steps=1, repeats=1, warmup=1, budget_s=0.5)
    assert bench['status'] == 'ok' and bench['parameters'] == sum(p.numel() for p in model.parameters())


def test_the_penalty_and_kl_weights_reach_the_loss():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(8, 1, 8, 8))
    plain = preset().model.build()
    weighted = preset(penalty_weight=0.5, balance=1).model.build()
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(1); out = plain(x, beta=0.5)
    torch.manual_seed(1); hooked = weighted(x, beta=0.5)
    penalty = 0.5 * sum((p ** 2).sum() for p in plain.decoder.parameters())
    torch.testing.assert_close(hooked.penalty, penalty)
    kl = out.kl.mean(0)
    torch.testing.assert_close(out.loss, out.reconstruction.mean() + 0.5 * kl.sum())
    torch.testing.assert_close(hooked.loss, out.reconstruction.mean() + 0.5 * (2.0 * kl[0] + 0.5 * kl[1]) + penalty)


def test_a_posterior_without_closed_form_kl_reports_the_one_sample_estimate():
    torch.manual_seed(0)
    model = preset(flow=1).model.build()
    with torch.no_grad(): model.shift.weight.mul_(5)                         # a flow that matters
    x = torch.bernoulli(torch.rand(4, 1, 8, 8)).repeat(4000, 1, 1, 1)
    with torch.no_grad(): t = model.trace(x)
    # the top group's KL column is log q(z) - log p(z) at the sample, so it equals minus its log-ratio exactly
    torch.testing.assert_close(t.kl[:, 1], -t.log_ratio[:, 1])
    # and its mean is the KL of the flowed posterior: positive, and not the base Gaussian's analytic KL
    base = DiagonalGaussian(*gaussian_params(model.heads[1](model.bottom_up(x[:4]))))
    analytic = sum_except_batch(base.kl(DiagonalGaussian.standard(base.mean.shape))).mean()
    estimate = t.kl[:, 1].mean()
    assert estimate > 0 and abs(estimate - analytic) > 10 * t.kl[:, 1].std() / math.sqrt(len(x))


def test_a_model_without_its_walk_cannot_be_made():
    class NoWalk(HierarchicalVAE):
        latent_shapes = [(1,)]
        def bottom_up(self, x): return x
    with pytest.raises(TypeError, match='top_down'):
        NoWalk()


def test_a_configuration_that_cannot_be_built_fails_when_made():
    with pytest.raises(ConfigError, match='TwoGroupConfig.width must be positive'):
        TwoGroupConfig(width=0)


@pytest.mark.parametrize('name', ['vae_digits', 'lvae_digits', 'nvae_digits', 'vdvae_digits', 'nlayer_digits'])
def test_k_walks_from_one_bottom_up_pass_equal_k_walks_of_the_repeated_batch(name):
    from hvae_nb.presets import get_preset
    from hvae_nb.vae import evaluating, repeat_batch
    torch.manual_seed(0)
    preset = get_preset(name)
    model = preset.model.build()
    x = torch.bernoulli(torch.full((5, *preset.model.image_shape), 0.4))
    with evaluating(model):
        torch.manual_seed(3); shared = model.log_weights(x, 4)
        torch.manual_seed(3); repeated = model.log_weight(repeat_batch(x, 4)).view(4, 5)
    assert shared.shape == (4, 5)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-3)
    # rows j*B + i are example i: walks of other examples would give other weights
    assert not torch.allclose(shared[:, 0], shared[:, 1])
