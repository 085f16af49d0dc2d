"""Getting at the latents, for every family: encode, decode, interpolate, traverse, and sampling
with a temperature per group or with the top groups given (the interface's `Sampling`). Each check
compares two different paths through a model, or a walk with a closed form (a group drawn at
temperature 0 is its prior's mean): decoding the posterior means walks the posterior walk's groups,
priors and parameters; an interpolation's ends are the two encodings; a traversal moves one unit of
one group, to its prior's mean plus so many scales, and holds the groups above."""
import sys
from contextlib import contextmanager
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


@contextmanager
def recorded(model, method: str):
    "The arguments of every call of `model`'s `method` within the block (the method itself runs)."
    calls, original = [], getattr(model, method)
    def recording(*args):
        calls.append(args)
        return original(*args)
    setattr(model, method, recording)
    try: yield calls
    finally: delattr(model, method)


@pytest.mark.parametrize('name', FAMILIES)
def test_decoding_the_encoding_walks_the_posterior_walk_of_means(name):
    """Given every group's posterior mean, a walk from the prior goes through the posterior walk's
    groups, priors and likelihood parameters."""
    model, x = model_and_images(name)
    with torch.no_grad():
        posterior = model.posterior_walk(x, use_mean=True)
        latents = model.encode(x)
        given = model.top_down(None, len(x), 0, Sampling(latents=dict(enumerate(latents))))
    for g, (mine, theirs) in enumerate(zip(given.groups, posterior.groups)):
        assert torch.equal(mine.z, latents[g]) and torch.equal(latents[g], theirs.posterior.mean)
        torch.testing.assert_close(mine.prior.mean, theirs.prior.mean)
        torch.testing.assert_close(mine.prior.scale, theirs.prior.scale)
    torch.testing.assert_close(given.params, posterior.params)
    torch.testing.assert_close(model.decode(latents), model.likelihood.mean(posterior.params))


@pytest.mark.parametrize('name', FAMILIES)
def test_interpolation_runs_from_one_encoding_to_the_other(name):
    model, x = model_and_images(name)
    start, end = model.encode(x[:2]), model.encode(x[2:])
    with recorded(model, 'decode') as decoded: frames = model.interpolate(x[:2], x[2:], steps=3)
    assert frames.shape == (3, 2, 1, 8, 8) and len(decoded) == 3
    for g in range(model.num_groups):        # the ends are the encodings, the middle their average
        assert torch.equal(decoded[0][0][g], start[g]) and torch.equal(decoded[-1][0][g], end[g])
        torch.testing.assert_close(decoded[1][0][g], (start[g] + end[g]) / 2)
    torch.testing.assert_close(frames[0], model.reconstruct(x[:2]))
    torch.testing.assert_close(frames[-1], model.reconstruct(x[2:]))
    # in one group alone: the groups above held at x_from's encoding, the group's own ends are the
    # encodings', the groups below follow their priors (their means at temperature 0)
    for group in sorted({0, model.num_groups - 1}):
        with recorded(model, 'sample') as sampled:
            only = model.interpolate(x[:2], x[2:], steps=3, group=group)
        assert [(n, t, sorted(given)) for n, t, given in sampled] == \
            [(2, 0.0, list(range(group, model.num_groups)))] * 3
        for l in range(group + 1, model.num_groups):
            assert all(torch.equal(given[l], start[l]) for _, _, given in sampled)
        assert torch.equal(sampled[0][2][group], start[group])
        assert torch.equal(sampled[-1][2][group], end[group])
        above = {l: start[l] for l in range(group + 1, model.num_groups)}
        torch.testing.assert_close(only[-1], model.sample(2, 0.0, {**above, group: end[group]}))


@pytest.mark.parametrize('name', FAMILIES)
def test_a_traversal_moves_one_unit_of_one_group(name):
    """The chosen unit at its prior's mean + v scales (the prior of a walk given the groups above),
    every other unit of the group and every group above at the encoding."""
    model, x = model_and_images(name)
    latents, values = model.encode(x), [-2.0, 0.0, 2.0]
    for group in sorted({0, model.num_groups - 1}):
        unit = latents[group][0].numel() - 1
        above = {l: latents[l] for l in range(group + 1, model.num_groups)}
        with torch.no_grad():
            prior = model.top_down(None, len(x), 0, Sampling(0.0, above)).groups[group].prior
        with recorded(model, 'sample') as sampled: frames = model.traverse(x, group, unit, values)
        assert frames.shape == (3, 4, 1, 8, 8) and len(sampled) == 3
        for v, (n, temperature, given) in zip(values, sampled):
            assert (n, temperature, sorted(given)) == (4, 0.0, list(range(group, model.num_groups)))
            assert all(torch.equal(given[l], z) for l, z in above.items())
            moved, encoded = given[group].flatten(1), latents[group].flatten(1)
            assert torch.equal(moved[:, :unit], encoded[:, :unit])
            expected = prior.mean.flatten(1)[:, unit] + v * prior.scale.flatten(1)[:, unit]
            torch.testing.assert_close(moved[:, unit], expected)
        assert not torch.equal(frames[0], frames[2])            # the unit matters to the image


def test_a_walk_that_does_not_number_its_groups_refuses_a_per_group_sampling():
    from hvae_nb.distributions import DiagonalGaussian
    from hvae_nb.vae import Group
    prior = DiagonalGaussian.standard((2, 3))
    assert Group.draw(prior, temperature=Sampling(0.5)).z.shape == (2, 3)       # one temperature: fine
    with pytest.raises(ValueError, match="group's number"):
        Group.draw(prior, temperature=Sampling((0.5, 1.0)))
