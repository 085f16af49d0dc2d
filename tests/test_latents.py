"""Getting at the latents, for every family: encode, decode, interpolate, traverse, and sampling with a temperature per
group or with the top groups given (the interface's `Sampling`). Each check compares two different paths through a
model, or a walk with a closed form (a group drawn at temperature 0 is its prior's mean)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.vae import Sampling, evaluating  # noqa: E402

FAMILIES = ['vae_digits', 'lvae_digits', 'nvae_digits', 'vdvae_digits', 'nlayer_digits']


def model_and_images(name: str):
    torch.manual_seed(0)
    model = get_preset(name).model.build().eval()
    with torch.no_grad():                       # moved away from its initialisation, where priors are trivial
        for p in model.parameters(): p.add_(0.05 * torch.randn_like(p))
    return model, torch.bernoulli(torch.full((4, 1, 8, 8), 0.3))


@pytest.mark.parametrize('name', FAMILIES)
def test_decoding_the_encoding_is_the_reconstruction(name):
    "decode(encode(x)): a walk from the prior with every group given, against the posterior walk of means."
    model, x = model_and_images(name)
    latents = model.encode(x)
    assert [tuple(z.shape[1:]) for z in latents] == [tuple(s) for s in model.latent_shapes]
    torch.testing.assert_close(model.decode(latents), model.reconstruct(x))


@pytest.mark.parametrize('name', FAMILIES)
def test_a_temperature_per_group_and_given_latents(name):
    model, x = model_and_images(name)
    G = model.num_groups
    with evaluating(model):
        # a group at temperature 0 is its prior's mean, the others are drawn
        cold = G - 1 if G > 1 else 0
        temperatures = tuple(0.0 if g == cold else 1.0 for g in range(G))
        walk = model.top_down(None, 4, 0, Sampling(temperatures))
        torch.testing.assert_close(walk.groups[cold].z, walk.groups[cold].prior.mean)
        # one temperature for every group, as a number or as a list: the same draws
        torch.manual_seed(1); one = model.sample(4, 0.7)
        torch.manual_seed(1); each = model.sample(4, [0.7] * G)
        torch.testing.assert_close(one, each)
        # the top group given: it is held, and the groups below are drawn afresh
        top = model.encode(x)[G - 1]
        first = model.top_down(None, 4, 0, Sampling(latents={G - 1: top}))
        second = model.top_down(None, 4, 0, Sampling(latents={G - 1: top}))
        assert torch.equal(first.groups[G - 1].z, top) and torch.equal(second.groups[G - 1].z, top)
        if G > 1: assert not torch.equal(first.groups[0].z, second.groups[0].z)


@pytest.mark.parametrize('name', ['lvae_digits', 'vdvae_digits'])
def test_interpolation_and_traversal(name):
    model, x = model_and_images(name)
    frames = model.interpolate(x[:2], x[2:], steps=5)
    assert frames.shape == (5, 2, 1, 8, 8)
    torch.testing.assert_close(frames[0], model.reconstruct(x[:2]))
    torch.testing.assert_close(frames[-1], model.reconstruct(x[2:]))
    # in the top group alone: the groups below follow their priors (their means at temperature 0)
    top = model.num_groups - 1
    only_top = model.interpolate(x[:2], x[2:], steps=3, group=top)
    torch.testing.assert_close(only_top[0], model.sample(2, 0.0, {top: model.encode(x[:2])[top]}))
    torch.testing.assert_close(only_top[-1], model.sample(2, 0.0, {top: model.encode(x[2:])[top]}))
    # one unit of the top group at its prior's mean +- 2 scales: three decodings, the middle at the mean
    steps = model.traverse(x, model.num_groups - 1, 0, [-2.0, 0.0, 2.0])
    assert steps.shape == (3, 4, 1, 8, 8) and not torch.equal(steps[0], steps[2])


def test_a_walk_that_does_not_number_its_groups_refuses_a_per_group_sampling():
    from hvae_nb.distributions import DiagonalGaussian
    from hvae_nb.vae import Group
    prior = DiagonalGaussian.standard((2, 3))
    assert Group.draw(prior, temperature=Sampling(0.5)).z.shape == (2, 3)       # one temperature: fine
    with pytest.raises(ValueError, match="group's number"):
        Group.draw(prior, temperature=Sampling((0.5, 1.0)))
