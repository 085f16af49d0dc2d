"""Fast checks of the Ladder VAE, the residual normal and the latent diagnostics (the notebooks hold the full story)."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Test the working tree even when the package is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvae_nb.distributions import DiagonalGaussian, gaussian_kl  # noqa: E402
from hvae_nb.diagnostics import active_units, kl_per_group  # noqa: E402
from hvae_nb.lvae import LVAEConfig, precision_weighted  # noqa: E402
from hvae_nb.vae import kl_warmup  # noqa: E402
from hvae_nb.configs import MODEL_FAMILIES  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.residual_normal import residual_normal_kl, residual_posterior  # noqa: E402

SMALL = LVAEConfig(image_shape=(1, 8, 8), latent_dims=(6, 4, 2), hidden_dims=(32, 16, 8))


def test_precision_weighted_is_the_normalised_product():
    torch.manual_seed(0)
    a = DiagonalGaussian(torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64))
    b = DiagonalGaussian(torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64))
    merged = precision_weighted(a, b)
    z = 3 * torch.randn(20, 50, dtype=torch.float64)
    # log a(z) + log b(z) - log merged(z) is the log normaliser N(mu_a; mu_b, s_a^2 + s_b^2), the same for every z
    normaliser = torch.distributions.Normal(b.mean, (a.scale ** 2 + b.scale ** 2).sqrt()).log_prob(a.mean)
    assert torch.allclose(a.log_prob(z) + b.log_prob(z) - merged.log_prob(z), normaliser.expand(20, -1), atol=1e-9)


def test_residual_kl_matches_the_general_kl():
    torch.manual_seed(0)
    prior = DiagonalGaussian(3 * torch.randn(2000, dtype=torch.float64), torch.randn(2000, dtype=torch.float64))
    delta_mean, delta_log_scale = torch.randn(2000, dtype=torch.float64), 0.5 * torch.randn(2000, dtype=torch.float64)
    q = residual_posterior(prior, delta_mean, delta_log_scale)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.scale), torch.distributions.Normal(prior.mean, prior.scale))
    assert torch.allclose(residual_normal_kl(delta_mean, delta_log_scale, prior.log_scale), reference, rtol=1e-5, atol=1e-9)
    assert torch.allclose(q.kl(prior), gaussian_kl(q.mean, q.log_scale, prior.mean, prior.log_scale), rtol=1e-5, atol=1e-9)


def test_kl_warmup_is_linear_then_one():
    assert [kl_warmup(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_warmup(10, 0) == 1.0


@pytest.mark.parametrize("config", [SMALL, replace(SMALL, posterior='residual'), replace(SMALL, inference='bottom_up'),
                                    replace(SMALL, batch_norm=False)])
def test_model_answers_the_interface(config):
    torch.manual_seed(0)
    model = config.build()
    x = torch.bernoulli(torch.rand(5, 1, 8, 8))
    out = model(x, beta=0.5, free_bits=0.1)
    assert out.kl.shape == (5, 3) and out.reconstruction.shape == (5,) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.sample(3, temperature=0.7).shape == (3, 1, 8, 8)
    assert model.reconstruct(x).shape == x.shape and model.reconstruct_keep(x, 2).shape == x.shape
    assert [m.shape for m in model.posterior_means(x)] == [(5, 6), (5, 4), (5, 2)]
    assert model.log_weight(x).shape == (5,)


def test_bad_configurations_fail_with_a_message():
    with pytest.raises(ValueError, match="needs inference='ladder'"):
        replace(SMALL, inference='bottom_up', posterior='residual').build()
    with pytest.raises(ValueError, match='same length'):
        replace(SMALL, hidden_dims=(32, 16)).build()


def test_presets_are_registered():
    assert MODEL_FAMILIES['lvae'] is LVAEConfig
    assert get_preset('lvae_digits').model.family == 'lvae'
    paper = get_preset('lvae_mnist')
    # Sønderby et al. (2016), MNIST: layers of 64-32-16-8-4 units under MLPs of 512-256-128-64-32, Adam at 1e-3,
    # batches of 256, 2000 epochs of MNIST's 60,000 training images, the KL warmed up over the first 200
    assert paper.model.latent_dims == (64, 32, 16, 8, 4) and paper.model.hidden_dims == (512, 256, 128, 64, 32)
    assert (paper.train.batch_size, paper.train.lr) == (256, 1e-3)
    steps_per_epoch = 60_000 / paper.train.batch_size
    assert paper.train.max_steps == round(2000 * steps_per_epoch)
    assert paper.train.kl_warmup_steps == round(200 * steps_per_epoch)
    # the one-hour recipe (chapter 03): the same model, a cosine from 1e-3 down to 2e-5, EMA 0.999, 60 minutes
    hour = get_preset('lvae_mnist_hour')
    assert hour.model == paper.model and hour.dataset == 'binarized_mnist'
    assert hour.train.min_lr_ratio == pytest.approx(2e-5 / hour.train.lr) and hour.train.lr == paper.train.lr
    assert (hour.train.max_minutes, hour.train.ema_decay) == (60, 0.999)


def test_diagnostics_through_the_interface():
    "The batched diagnostics agree with a direct computation on the whole set, in eval mode, for every variant."
    torch.manual_seed(0)
    images = torch.bernoulli(torch.rand(64, 1, 8, 8))
    for config in (SMALL, replace(SMALL, posterior='residual'), replace(SMALL, inference='bottom_up')):
        model = config.build().train()
        with torch.no_grad(): model(images)          # batch norm's running statistics move away from their start
        kl = kl_per_group(model, images, batch_size=20)
        model.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            direct_kl = torch.stack([model.trace(images).kl.mean(0) for _ in range(200)]).mean(0)
            q_means, p_means = model.latent_means(images)
        model.train()
        # one sample per image against the mean of 200: equal within a few standard errors, per group
        assert torch.allclose(kl, direct_kl, rtol=0.1, atol=0.05), (config, kl, direct_kl)
        variances = [m.var(0) for m in q_means]
        threshold = torch.cat(variances).median().item()     # a threshold that splits the units
        active = active_units(model, images, batch_size=20, threshold=threshold)
        assert active.sizes == [6, 4, 2] and 0 < active.total < 12
        assert active.per_group == [int((v > threshold).sum()) for v in variances]
        beyond = [(q - p).var(0) for q, p in zip(q_means, p_means)]
        assert active.per_group_beyond_prior == [int((v > threshold).sum()) for v in beyond]
        for found, expected in zip(active.variances, variances): assert torch.allclose(found, expected, atol=1e-6)
        assert model.training  # mode restored


def test_a_collapsed_group_is_active_by_burda_but_not_beyond_its_prior():
    # Residual posterior whose middle layer's bottom-up head outputs zeros: q(z_1 | z_2, x) = p(z_1 | z_2) exactly,
    # so the layer's KL is zero; its posterior mean still follows x through the prior mean, which Burda's statistic counts.
    torch.manual_seed(0)
    model = replace(SMALL, posterior='residual').build()
    head = model.posterior_heads[1].linear
    torch.nn.init.zeros_(head.weight); torch.nn.init.zeros_(head.bias)
    with torch.no_grad(): model.posterior_heads[2].linear.weight.mul_(100)   # a top layer that moves with x
    images = torch.bernoulli(torch.rand(256, 1, 8, 8))
    kl = kl_per_group(model, images, batch_size=64)
    active = active_units(model, images, batch_size=64, threshold=1e-6)
    assert kl[1] == pytest.approx(0, abs=1e-6) and kl[0] > 0 and kl[2] > 0
    assert active.per_group[1] >= 1 and active.per_group_beyond_prior[1] == 0
    assert active.variances_beyond_prior[1].max() < 1e-10 < 1e-6 < active.variances[1].max()
    assert torch.equal(active.variances_beyond_prior[2], active.variances[2])  # the top layer's prior is fixed: the same statistic
