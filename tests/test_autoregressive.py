"""Fast checks of chapter 09a: MADE is autoregressive, the N-layer VAEs of Proposition 1 compute the autoregressive
log-likelihood (exactly with binary latents, in the limit with Gaussian ones), and the learned N-layer VAE answers
the library's interface and trains with the library's trainer (the notebook holds the full story)."""
import itertools, json, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Test the working tree even when the package is not pip-installed.
sys.path.insert(0, str(ROOT))

from hvae_nb.autoregressive import (BernoulliMADE, DiscreteNLayerVAE, GaussianMADE, NLayerVAEConfig,  # noqa: E402
                                    gaussian_copy_vae)
from hvae_nb.configs import MODEL_FAMILIES  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402


def strictly_before(made) -> torch.Tensor: return made.rank[None, :] < made.rank[:, None]


@pytest.mark.parametrize("order", [None, torch.randperm(20, generator=torch.Generator().manual_seed(0))])
def test_made_outputs_read_only_earlier_inputs(order):
    torch.manual_seed(0)
    made = GaussianMADE(20, (64, 32), order=order)
    assert torch.equal(made.dependencies(), strictly_before(made))
    jacobian = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], torch.rand(20))   # (2, 20, 20)
    assert (jacobian[:, ~strictly_before(made)] == 0).all() and (jacobian[:, strictly_before(made)] != 0).all()


def test_made_is_normalised():
    torch.manual_seed(0)
    made = BernoulliMADE(8, (16, 16), order=torch.randperm(8))
    every_vector = torch.tensor(list(itertools.product([0.0, 1.0], repeat=8)))
    assert abs(torch.logsumexp(made.log_prob(every_vector), 0).exp().item() - 1) < 1e-5


def test_binary_n_layer_vae_elbo_is_the_autoregressive_log_likelihood():
    torch.manual_seed(0)
    made = BernoulliMADE(16, (32, 32), order=torch.randperm(16)).double()
    x = torch.bernoulli(torch.rand(50, 1, 4, 4, dtype=torch.float64))
    with torch.no_grad(): error = (DiscreteNLayerVAE(made).elbo(x) - made.log_prob(x)).abs().max().item()
    assert error < 1e-9


def test_gaussian_copy_vae_closes_the_gap():
    torch.manual_seed(0)
    made = GaussianMADE(16, (32,)).double()
    x = torch.rand(30, 1, 4, 4, dtype=torch.float64)
    model = gaussian_copy_vae(made, 1e-2, (1, 4, 4))
    torch.manual_seed(1); weight = model.log_weight(x)
    torch.manual_seed(1); z = x.flatten(1) + 1e-2 * torch.randn(30, 16, dtype=torch.float64)
    assert torch.allclose(weight, made.log_prob(z), atol=1e-9)     # log p(x|z) - log q(z|x) cancels per sample
    gaps = []
    for scale in (1e-1, 1e-2, 1e-3):
        model = gaussian_copy_vae(made, scale, (1, 4, 4))
        with torch.no_grad(): elbo = torch.stack([model.log_weight(x) for _ in range(200)]).mean(0)
        gaps.append((made.log_prob(x) - elbo).mean().item())
    assert gaps[0] > 10 * abs(gaps[1]) and abs(gaps[2]) < 1e-3


@pytest.mark.parametrize("decoder", ['mlp', 'pixel'])
def test_n_layer_vae_answers_the_interface(decoder):
    torch.manual_seed(0)
    model = NLayerVAEConfig(image_shape=(1, 4, 4), encoder_dims=(16,), prior_dims=(16,), decoder_dims=(16,),
                            decoder=decoder).build()
    x = torch.bernoulli(torch.rand(5, 1, 4, 4))
    out = model(x, beta=0.5, free_bits=0.1)
    assert out.kl.shape == (5, 16) and out.reconstruction.shape == (5,) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.sample(3, temperature=0.7).shape == (3, 1, 4, 4)
    assert model.reconstruct(x).shape == x.shape and model.reconstruct_keep(x, 5).shape == x.shape
    assert [m.shape for m in model.posterior_means(x)] == [(5, 1)] * 16
    # the walk's terms, computed on whole tensors, are each group's own terms
    walk = model.top_down(model.bottom_up(x), len(x), model.num_groups)
    one_by_one = [torch.stack(t, 1) for t in zip(*(g.terms() for g in walk.groups))]
    for stacked, each in zip(walk.terms, one_by_one): assert torch.allclose(stacked, each)


def test_bad_configurations_fail_with_a_message():
    with pytest.raises(ValueError, match='NLayerVAEConfig.decoder'): NLayerVAEConfig(decoder='conv')
    with pytest.raises(ValueError, match="'mlp' unless"):
        NLayerVAEConfig(decoder='pixel', likelihood='logistic_mixture')


def test_the_trainer_trains_the_preset(tmp_path):
    assert MODEL_FAMILIES['nlayer'] is NLayerVAEConfig and get_preset('nlayer_digits').model.family == 'nlayer'
    command = [sys.executable, '-m', 'hvae_nb.train', '--preset', 'nlayer_digits', '--no-progress', '--max-steps', '20',
               '--out', str(tmp_path / 'run'), '--override', 'eval_every=100000', 'final_eval_samples=5',
               'kl_warmup_steps=10']
    environment = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg', PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    final = [r['test'] for r in records if 'test' in r][-1]
    assert final['num_examples'] == 297 and math.isfinite(final['nll_nats']) and final['nll_nats'] < 64 * math.log(2)
