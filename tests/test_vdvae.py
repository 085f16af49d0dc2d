"""Fast checks of the Very Deep VAE (chapter 09) and of the converter of its official checkpoints
(chapter 14)."""

import json, math, os, subprocess, sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # test the working tree even when the package is not pip-installed

from hvae_nb.configs import apply_overrides  # noqa: E402
from hvae_nb.convert import (
    convert_vdvae,
    main as convert_main,
    official_vdvae_name,
    read_checkpoint,
)  # noqa: E402
from hvae_nb.configs import MODEL_FAMILIES  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.runs import RunError, from_pretrained  # noqa: E402
from hvae_nb.configs import ConfigError  # noqa: E402
from hvae_nb.vdvae import VDVAEConfig, VDVAEMixture, parse_layer_string  # noqa: E402

ENVIRONMENT = dict(
    os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', MPLBACKEND='Agg', PYTHONUNBUFFERED='1'
)
SMALL = VDVAEConfig(width=16, latent_channels=4)


def run_module(module: str, *args) -> subprocess.CompletedProcess:
    "`python -m module args...` from the checkout, one thread, output captured."
    return subprocess.run([sys.executable, '-m', module, *map(str, args)], capture_output=True,
                          text=True, env=ENVIRONMENT, cwd=ROOT, timeout=300)

# an official-shaped model small enough for a test: the CIFAR-10 preset with fewer, narrower blocks
TINY = dict(
    enc_blocks='32x2,32d2,16x1,16d2,8x1,8d4,2x1,2d2,1x1',
    dec_blocks='1x1,2m1,2x1,8m2,8x1,16m8,16x1,32m16,32x2',
    width=16,
    zdim=4,
)
TINY_OVERRIDES = {
    'model.encoder_blocks': TINY['enc_blocks'],
    'model.decoder_blocks': TINY['dec_blocks'],
    'model.width': '16',
    'model.latent_channels': '4',
}


# ---- the official definitions, restated from openai/vdvae for these tests ------------------------
def official_blocks(text):
    "(resolution, pooling or mix-in rate or None) per block, as the official parse_layer_string."
    for token in text.split(','):
        letter = next((l for l in 'xmd' if l in token), None)
        r, n = (int(v) for v in token.split(letter)) if letter else (int(token), 1)
        yield from [(r, n if letter in ('m', 'd') else None)] * (n if letter == 'x' else 1)


def official_shapes(enc_blocks, dec_blocks, width, zdim, custom='', mixtures=10, no_bias_above=64):
    "Key -> shape of the official VAE's state dict (Encoder, DecBlock, Decoder, DmolNet)."
    widths = {int(a): int(b) for a, b in (p.split(':') for p in custom.split(',') if p)}
    w_at = lambda r: widths.get(r, width)
    shapes = {}

    def conv(key, c_in, c_out, k):
        shapes.update({key + '.weight': (c_out, c_in, k, k), key + '.bias': (c_out,)})

    def block(key, c_in, middle, c_out, r):
        k = 3 if r > 2 else 1
        for i, (a, b, kernel) in enumerate(
            ((c_in, middle, 1), (middle, middle, k), (middle, middle, k), (middle, c_out, 1))
        ):
            conv(f'{key}.c{i + 1}', a, b, kernel)

    conv('encoder.in_conv', 3, width, 3)
    for i, (r, _) in enumerate(official_blocks(enc_blocks)):
        block(f'encoder.enc_blocks.{i}', w_at(r), w_at(r) // 4, w_at(r), r)
    for i, (r, _) in enumerate(official_blocks(dec_blocks)):
        w = w_at(r)
        block(f'decoder.dec_blocks.{i}.enc', 2 * w, w // 4, 2 * zdim, r)
        block(f'decoder.dec_blocks.{i}.prior', w, w // 4, 2 * zdim + w, r)
        conv(f'decoder.dec_blocks.{i}.z_proj', zdim, w, 1)
        block(f'decoder.dec_blocks.{i}.resnet', w, w // 4, w, r)
    resolutions = sorted({r for r, _ in official_blocks(dec_blocks) if r <= no_bias_above})
    shapes.update({f'decoder.bias_xs.{i}': (1, w_at(r), r, r) for i, r in enumerate(resolutions)})
    conv('decoder.out_net.out_conv', width, 10 * mixtures, 1)
    shapes.update({'decoder.gain': (1, width, 1, 1), 'decoder.bias': (1, width, 1, 1)})
    return shapes


def official_checkpoint(seed=0):
    """Random tensors under every official key of the tiny model (weights 0.5 / sqrt(fan in), the
    rest around 0.1)."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(shape):
        scale = 0.5 / math.sqrt(math.prod(shape[1:])) if len(shape) == 4 and shape[0] != 1 else 0.1
        return scale * torch.randn(shape, generator=generator)

    return {key: tensor(shape) for key, shape in official_shapes(**TINY).items()}


def official_loss(state, pixels, shift=-120.63838, scale=1 / 64.16736):
    """openai/vdvae's VAE.forward (ELBO in nats per dimension) from its state dict, on uint8 images
    (B, H, W, 3)."""
    conv = lambda x, key: F.conv2d(
        x,
        state[key + '.weight'],
        state[key + '.bias'],
        padding=state[key + '.weight'].shape[-1] // 2,
    )

    def block(x, key, residual=False, down=None):
        h = x
        for i in range(1, 5):
            h = conv(F.gelu(h), f'{key}.c{i}')
        out = x + h if residual else h
        return F.avg_pool2d(out, down, down) if down else out

    h = conv(((pixels.float() + shift) * scale).permute(0, 3, 1, 2), 'encoder.in_conv')
    activations = {h.shape[2]: h}
    for i, (_, down) in enumerate(official_blocks(TINY['enc_blocks'])):
        h = block(h, f'encoder.enc_blocks.{i}', residual=True, down=down)
        activations[h.shape[2]] = h
    xs = {state[k].shape[2]: state[k] for k in state if k.startswith('decoder.bias_xs.')}
    zdim, rate = TINY['zdim'], 0
    for i, (r, mixin) in enumerate(official_blocks(TINY['dec_blocks'])):
        key, acts = f'decoder.dec_blocks.{i}', activations[r]
        h = xs.get(r, torch.zeros_like(acts))
        if h.shape[0] != acts.shape[0]:
            h = h.repeat(acts.shape[0], 1, 1, 1)
        if mixin:
            h = h + F.interpolate(xs[mixin][:, : h.shape[1]], scale_factor=r // mixin)
        qm, qv = block(torch.cat([h, acts], 1), f'{key}.enc').chunk(2, 1)
        feats = block(h, f'{key}.prior')
        pm, pv = feats[:, :zdim], feats[:, zdim : 2 * zdim]
        h = h + feats[:, 2 * zdim :]
        z = torch.exp(qv) * torch.empty_like(qm).normal_(0.0, 1.0) + qm
        rate = rate + (-0.5 + pv - qv + 0.5 * (qv.exp() ** 2 + (qm - pm) ** 2) / pv.exp() ** 2).sum(
            (1, 2, 3)
        )
        xs[r] = block(h + conv(z, f'{key}.z_proj'), f'{key}.resnet', residual=True)
    out = conv(
        xs[32] * state['decoder.gain'] + state['decoder.bias'], 'decoder.out_net.out_conv'
    ).permute(0, 2, 3, 1)
    return (mixture_nll(pixels.float() / 127.5 - 1, out) + rate / pixels[0].numel()).mean()


def mixture_nll(x, out):
    """The official discretized_mix_logistic_loss (8-bit), per dimension; x (B,H,W,3) on [-1, 1],
    out (B,H,W,10M)."""
    b, h, w, c = x.shape
    m = out.shape[-1] // 10
    logits, rest = out[..., :m], out[..., m:].reshape(b, h, w, c, 3 * m)
    means, log_scales, coefficients = (
        rest[..., :m],
        rest[..., m : 2 * m].clamp_min(-7.0),
        torch.tanh(rest[..., 2 * m :]),
    )
    x = x.unsqueeze(-1).expand(b, h, w, c, m)
    coupled = torch.stack(
        [
            means[..., 0, :],
            means[..., 1, :] + coefficients[..., 0, :] * x[..., 0, :],
            means[..., 2, :]
            + coefficients[..., 1, :] * x[..., 0, :]
            + coefficients[..., 2, :] * x[..., 1, :],
        ],
        3,
    )
    centred, inverse = x - coupled, torch.exp(-log_scales)
    plus, minus, mid = (
        inverse * (centred + 1 / 255),
        inverse * (centred - 1 / 255),
        inverse * centred,
    )
    delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    log_probs = torch.where(
        x < -0.999,
        plus - F.softplus(plus),
        torch.where(
            x > 0.999,
            -F.softplus(minus),
            torch.where(
                delta > 1e-5,
                torch.log(delta.clamp_min(1e-12)),
                mid - log_scales - 2 * F.softplus(mid) - math.log(127.5),
            ),
        ),
    )
    return -torch.logsumexp(log_probs.sum(3) + torch.log_softmax(logits, -1), -1).sum((1, 2)) / (
        h * w * c
    )


def tiny_preset():
    return apply_overrides(get_preset('vdvae_cifar10'), TINY_OVERRIDES)


def write_fake_cifar(root: Path, count: int = 4, seed: int = 0) -> Path:
    "A data directory with CIFAR-10 in its binary format: `count` random records per batch file."
    folder = root / 'cifar10' / 'cifar-10-batches-bin'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
        records = np.concatenate(
            [rng.integers(0, 10, (count, 1)), rng.integers(0, 256, (count, 3072))], 1
        )
        (folder / name).write_bytes(records.astype(np.uint8).tobytes())
    return root


# ---- the model -----------------------------------------------------------------------------------
def test_layer_strings_fail_naming_the_token():
    assert len(parse_layer_string('32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3', 'd')) == 33
    assert len(parse_layer_string('1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21', 'm')) == 43
    for field, value, message in (
        ('encoder_blocks', '8x2,8k2', "token '8k2'"),
        ('decoder_blocks', '1x1,4d1', "token '4d1'"),
        ('encoder_blocks', '8x2,8d2,2x1', "token '2x1' runs at resolution 2"),
        ('decoder_blocks', '1x1,4m2,8m4', "token '4m2' mixes in resolution 2"),
    ):
        with pytest.raises(ConfigError) as error:
            replace(SMALL, **{field: value})
        assert message in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('name', ['vdvae_cifar10', 'vdvae_ffhq1024'])
def test_presets_build_the_official_architecture(name):
    model_config = get_preset(name).model
    with torch.device('meta'):
        model = model_config.build()
    ours = {official_vdvae_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes(
        model_config.encoder_blocks,
        model_config.decoder_blocks,
        model_config.width,
        16,
        model_config.custom_widths,
        model_config.num_mixtures,
    )
    assert (
        sum(p.numel() for p in model.parameters())
        == {'vdvae_cifar10': 39_145_700, 'vdvae_ffhq1024': 109_366_904}[name]
    )


def test_model_answers_the_interface_in_nats_per_image():
    torch.manual_seed(0)
    for config in (
        SMALL,
        VDVAEConfig(
            image_shape=(3, 8, 8),
            likelihood='logistic_mixture',
            num_mixtures=2,
            width=16,
            latent_channels=4,
        ),
    ):
        model = config.build()
        x = torch.rand(5, *config.image_shape)
        x = torch.bernoulli(x) if config.likelihood == 'bernoulli' else torch.round(x * 255) / 255
        out = model(x)
        assert out.kl.shape == (5, 7) and model.num_groups == 7
        # the loss in nats per image, as every family's; the objective in VDVAE's unit, nats per dimension
        assert torch.allclose(out.loss, (out.reconstruction + out.kl.sum(1)).mean())
        assert torch.allclose(out.objective, out.loss / math.prod(config.image_shape))
        out.objective.backward()
        assert model.sample(3, 0.5).shape == (3, *config.image_shape)
        assert model.reconstruct_keep(x, 3).shape == x.shape and model.log_weight(x).shape == (5,)
    assert MODEL_FAMILIES['vdvae'] is VDVAEConfig


def test_the_prior_starts_as_the_standard_normal():
    torch.manual_seed(0)
    model = SMALL.build()
    with torch.no_grad():
        walk = model.posterior_walk(torch.bernoulli(torch.rand(3, 1, 8, 8)))
    for group in walk.groups:
        assert (group.prior.mean == 0).all() and (group.prior.log_scale == 0).all()
        q = torch.distributions.Normal(group.posterior.mean, group.posterior.scale)
        assert torch.allclose(
            group.posterior.kl(group.prior),
            torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)),
            atol=1e-5,
        )


def test_mixture_head_reads_the_official_layout():
    torch.manual_seed(0)
    out, pixels = 2 * torch.randn(3, 30, 4, 4), torch.randint(0, 256, (3, 3, 4, 4)).float()
    ours = -VDVAEMixture(3).log_prob(out, pixels / 255) / 48
    assert torch.allclose(
        ours,
        mixture_nll((pixels / 127.5 - 1).permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)),
        rtol=1e-5,
    )


# ---- the 5-bit likelihood of FFHQ-256 and its sampler ----------------------------------------------
# The official 5-bit target is 8 floor(v / 8) on the 8-bit scale v / 127.5 - 1 (data.py), scored with bins of
# half-width 1/31 (discretized_mix_logistic_loss, low_bit): written here from that definition, not from our code.
OFFICIAL_LEVELS = 16 * torch.arange(32, dtype=torch.float64) / 255 - 1         # 8k / 127.5 - 1


def official_five_bit_probabilities(centre: float, scale: float) -> torch.Tensor:
    "P(level k), k = 0..31, of one logistic (centre, scale in 8-bit units): a brute-force loop."
    mu, s = centre / 127.5 - 1, scale / 127.5
    sigmoid = lambda t: 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))
    probabilities = []
    for k, g in enumerate(OFFICIAL_LEVELS.tolist()):
        upper = sigmoid((g + 1 / 31 - mu) / s)
        probabilities.append(upper if k == 0 else upper - sigmoid((g - 1 / 31 - mu) / s))
    return torch.tensor(probabilities, dtype=torch.float64)


def grey_params(centre: float, scale: float) -> torch.Tensor:
    "(1, 3, 1, 1): one component in VDVAE's grey layout (logit, mean, log-scale)."
    return torch.tensor([0.0, centre / 127.5 - 1, math.log(scale / 127.5)]).view(1, 3, 1, 1)


def five_bit_level_index(x: torch.Tensor) -> torch.Tensor:
    "The official level index of images in [0, 1]: floor(v / 8) of the 8-bit value v."
    return torch.div(torch.round(255 * x).long(), 8, rounding_mode='floor')


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    "scipy's Pearson test of `counts` against N * `probabilities` (normalised), small cells pooled."
    from scipy import stats
    n = counts.sum().item()
    expected = (n * probabilities / probabilities.sum()).double().numpy()
    observed = counts.double().numpy()
    kept = expected >= 5
    f_obs, f_exp = list(observed[kept]), list(expected[kept])
    if expected[~kept].sum() >= 5:
        f_obs.append(observed[~kept].sum()); f_exp.append(expected[~kept].sum())
    else:                                   # fold the little left into the smallest kept cell
        smallest = int(np.argmin(f_exp))
        f_obs[smallest] += observed[~kept].sum(); f_exp[smallest] += expected[~kept].sum()
    return stats.chisquare(f_obs, f_exp).pvalue


FIVE_BIT_GREY = [(96, 8), (130, 20), (245, 6), (255, 40), (20, 12)]


@pytest.mark.parametrize('centre, scale', FIVE_BIT_GREY + [(116.0, 0.12), (255, 0.5)])
def test_five_bit_log_prob_is_the_official_bins_and_not_normalised(centre, scale):
    likelihood = VDVAEMixture(1, bits=5)
    x = (8 * torch.arange(32) / 255).view(-1, 1, 1, 1)
    ours = likelihood.log_prob(grey_params(centre, scale).expand(32, -1, -1, -1), x).double().exp()
    reference = official_five_bit_probabilities(centre, scale)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_five_bit_probabilities_sum_from_almost_nothing_to_more_than_one():
    sums = {c_s: official_five_bit_probabilities(*c_s).sum().item()
            for c_s in [(96, 8), (116.0, 0.12), (245, 6), (255, 0.5)]}
    assert abs(sums[96, 8] - 0.0645 / 0.0627) < 0.003       # bin width over level spacing
    assert sums[116.0, 0.12] > 1.4 and sums[245, 6] < 0.8 and sums[255, 0.5] < 0.01


@pytest.mark.parametrize('centre, scale', FIVE_BIT_GREY)
def test_five_bit_sampler_follows_the_scored_probabilities(centre, scale):
    "Sampling frequencies of the 32 scored levels against the brute-force probabilities, normalised."
    from hvae_nb.distributions import DiscretizedLogisticMixture
    likelihood = VDVAEMixture(1, bits=5)
    params = grey_params(centre, scale).expand(100_000, -1, -1, -1)
    expected = official_five_bit_probabilities(centre, scale)
    torch.manual_seed(0)
    draws = likelihood.sample(params)
    assert torch.equal(likelihood.scored_levels(draws), draws)            # on the scored grid
    counts = torch.bincount(five_bit_level_index(draws).flatten(), minlength=32)
    assert chi_square_p_value(counts, expected) > 1e-4
    # the control: the k/31 sampler of chapter 00, its draws mapped to the levels log_prob scores
    wrong = five_bit_level_index(DiscretizedLogisticMixture.sample(likelihood, params))
    assert chi_square_p_value(torch.bincount(wrong.flatten(), minlength=32), expected) < 1e-10


def test_five_bit_spike_is_drawn_where_it_is_scored():
    "All the probability on the 8-bit value 160: drawn at 160, which log_prob scores as 160."
    likelihood = VDVAEMixture(1, bits=5)
    params = grey_params(160, 0.12).expand(1000, -1, -1, -1)
    torch.manual_seed(0)
    draws = likelihood.sample(params)
    assert (255 * draws).round().unique().tolist() == [160.0]
    assert likelihood.log_prob(params[:1], draws[:1]).item() > -1e-4


def test_five_bit_rgb_sampler_follows_the_joint_where_the_sums_are_equal():
    """Two coupled RGB components inside the range, at least a level wide: every channel's sum is
    the same 1.028, so the per-channel renormalisation is log_prob renormalised over all colours."""
    m = 2
    unit = lambda v: v / 127.5 - 1
    colours, scales = [(96, 152, 72), (176, 64, 128)], [6.0, 10.0]
    couplings = [(0.9, -0.6, 0.8), (-0.8, 0.5, -0.9)]
    per_channel = torch.zeros(3, 3, m)                  # (channel, mean | log-scale | coupling, M)
    for i, ((r, g, b), scale, (alpha, beta, gamma)) in enumerate(zip(colours, scales, couplings)):
        per_channel[:, 0, i] = torch.tensor([unit(r), unit(g) - alpha * unit(r),
                                             unit(b) - beta * unit(r) - gamma * unit(g)])
        per_channel[:, 1, i] = math.log(scale / 127.5)
        per_channel[:, 2, i] = torch.atanh(torch.tensor([alpha, beta, gamma]))
    params = torch.cat([torch.tensor([math.log(0.6), math.log(0.4)]), per_channel.flatten()])
    params = params.view(1, -1, 1, 1)
    likelihood = VDVAEMixture(m, bits=5)
    levels = 8 * torch.arange(32) / 255
    r, g, b = torch.meshgrid(levels, levels, levels, indexing='ij')
    every_colour = torch.stack([r, g, b], -1).view(-1, 3, 1, 1)      # index r * 1024 + g * 32 + b
    p = likelihood.log_prob(params.expand(len(every_colour), -1, -1, -1), every_colour).double().exp()
    assert abs(p.sum().item() - (0.0645 / 0.0627) ** 3) < 0.01
    torch.manual_seed(0)
    k = five_bit_level_index(likelihood.sample(params.expand(200_000, -1, -1, -1))).flatten(1)
    counts = torch.bincount((k[:, 0] * 32 + k[:, 1]) * 32 + k[:, 2], minlength=32 ** 3)
    assert chi_square_p_value(counts, p) > 1e-4


def test_eight_bit_mixture_keeps_chapter_00s_sampler():
    "At 8 bits the bins tile [-1, 1]: VDVAEMixture samples exactly as chapter 00's likelihood."
    from hvae_nb.distributions import DiscretizedLogisticMixture
    torch.manual_seed(0)
    params = torch.randn(2, 100, 3, 3)
    torch.manual_seed(1); ours = VDVAEMixture(10).sample(params)
    torch.manual_seed(1); base = DiscretizedLogisticMixture.sample(VDVAEMixture(10), params)
    assert torch.equal(ours, base)


# ---- the converter -------------------------------------------------------------------------------
def test_converted_checkpoint_computes_the_official_loss(tmp_path):
    state = official_checkpoint()
    torch.save(
        {'module.' + k: v for k, v in state.items()}, tmp_path / 'tiny-model-ema.th'
    )  # as saved from DDP
    model = from_pretrained(
        convert_vdvae(tmp_path / 'tiny-model-ema.th', tiny_preset(), tmp_path / 'run')
    )
    pixels = torch.randint(
        0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    with torch.no_grad():
        torch.manual_seed(2)
        ours = model(pixels.permute(0, 3, 1, 2).float() / 255).objective   # nats per dimension
        torch.manual_seed(2)
        theirs = official_loss(state, pixels)
    assert torch.isfinite(theirs) and torch.allclose(ours, theirs, rtol=1e-5), (ours, theirs)


@pytest.mark.parametrize(
    'change, message',
    [
        (
            lambda s: s.update(
                {'decoder.dec_blocks.2.zproj.weight': s.pop('decoder.dec_blocks.2.z_proj.weight')}
            ),
            "key 'decoder.dec_blocks.2.zproj.weight' is not a parameter",
        ),
        (lambda s: s.pop('decoder.bias_xs.1'), "key 'decoder.bias_xs.1' is missing"),
        (
            lambda s: s.update({'decoder.gain': torch.ones(1, 8, 1, 1)}),
            "key 'decoder.gain' has shape (1, 8, 1, 1), the preset's model "
            "expects (1, 16, 1, 1)",
        ),
    ],
)
def test_mismatched_checkpoints_fail_with_one_line(tmp_path, change, message):
    state = official_checkpoint()
    change(state)
    torch.save(state, tmp_path / 'bad.th')
    with pytest.raises(RunError) as error:
        convert_vdvae(tmp_path / 'bad.th', tiny_preset(), tmp_path / 'run')
    assert message in str(error.value) and '\n' not in str(error.value)
    assert not (tmp_path / 'run').exists()


def test_files_that_are_not_checkpoints(tmp_path, capsys):
    (tmp_path / 'notes.th').write_text('weights')
    torch.save([torch.ones(2)], tmp_path / 'list.th')
    for name, message in (
        ('notes.th', 'is not a PyTorch checkpoint'),
        ('list.th', 'does not hold a state dict'),
        ('absent.th', 'does not exist'),
    ):
        with pytest.raises(SystemExit) as status:
            convert_main(
                [
                    'vdvae',
                    str(tmp_path / name),
                    '--preset',
                    'vdvae_cifar10',
                    '--out',
                    str(tmp_path / 'run'),
                ]
            )
        error = capsys.readouterr().err
        assert status.value.code == 2 and error.count('\n') == 1 and message in error, error


def test_command_line_conversion_then_evaluation(tmp_path):
    torch.save({'module.' + k: v for k, v in official_checkpoint().items()}, tmp_path / 'tiny.th')
    overrides = ['--override'] + [f'{k}={v}' for k, v in TINY_OVERRIDES.items()]
    converted = run_module('hvae_nb.convert', 'vdvae', tmp_path / 'tiny.th', '--preset',
                           'vdvae_cifar10', '--out', tmp_path / 'run', *overrides)
    assert converted.returncode == 0, converted.stderr
    data = write_fake_cifar(tmp_path / 'data')
    evaluated = run_module('hvae_nb.evaluate', tmp_path / 'run', '--k', '2', '--batch-size', '2',
                           '--data-dir', data, '--no-figures', '--no-progress', '--device', 'cpu')
    assert evaluated.returncode == 0, evaluated.stderr
    (result,) = json.loads((tmp_path / 'run' / 'eval.json').read_text()).values()
    assert (
        result['num_examples'] == 4
        and math.isfinite(result['nll_bits_per_dim'])
        and len(result['kl_per_group_nats']) == 10
    )
    assert (
        json.loads((tmp_path / 'run' / 'config.json').read_text())['launch']['source']
        == 'openai/vdvae'
    )


def test_read_checkpoint_drops_the_ddp_prefix(tmp_path):
    torch.save({'module.a': torch.ones(1), 'b': torch.zeros(1)}, tmp_path / 'x.th')
    assert list(read_checkpoint(tmp_path / 'x.th')) == ['a', 'b']


# ---- training ------------------------------------------------------------------------------------
def test_vdvae_digits_trains_from_the_command_line(tmp_path):
    done = run_module('hvae_nb.train', '--preset', 'vdvae_digits', '--max-steps', '5',
                      '--out', tmp_path / 'run', '--no-progress', '--override',
                      'train.final_eval_samples=1', 'train.batch_size=16', 'model.width=8')
    assert done.returncode == 0, done.stderr
    records = [
        json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
    ]
    steps = [r for r in records if 'loss' in r]
    assert [r['step'] for r in steps] == [1, 2, 3, 4, 5] and all(
        math.isfinite(r['loss']) for r in steps
    )
    assert len(steps[0]['kl']) == 7 and 'test' in records[-1]
    assert from_pretrained(tmp_path / 'run').num_groups == 7
    for r in steps:   # the logged loss in the unit of every family: nats per image, its parts summed
        assert r['neg_elbo'] == pytest.approx(r['reconstruction'] + sum(r['kl']), rel=1e-4)
        assert r['loss'] == pytest.approx(r['reconstruction'] + r['beta'] * sum(r['kl']) + r['penalty'], rel=1e-4)


def test_skipped_updates_leave_the_weights_and_the_ema_alone(tmp_path, monkeypatch):
    "VDVAE's rule (train.py): an update is skipped as a whole, and the EMA is not updated either."
    import hvae_nb.train as trainer
    from torch.optim.swa_utils import AveragedModel

    decisions, ema_updates = iter([True, False, True, False]), []
    monkeypatch.setattr(trainer, 'should_skip', lambda loss, norm, threshold: next(decisions))
    update = AveragedModel.update_parameters
    monkeypatch.setattr(AveragedModel, 'update_parameters',
                        lambda self, model: (ema_updates.append(1), update(self, model))[1])
    preset = get_preset('vdvae_digits')
    short = replace(preset.train, max_steps=4, batch_size=16, eval_every=100, save_every=100,
                    final_eval_samples=1)
    narrow = replace(preset.model, width=8)
    result = trainer.train(replace(preset, model=narrow, train=short), out=tmp_path / 'run',
                           progress=False)
    steps = [r for r in result.metrics if 'loss' in r]
    assert [r['skipped_update'] for r in steps] == [True, False, True, False]
    assert steps[-1]['skipped'] == 2 and len(ema_updates) == 2
