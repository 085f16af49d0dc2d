"""FID (hvae_nb.fid, chapter 12a): the distance, the network, loading its weights, `fid_score`.

Independent references:
- the Fréchet distance: SciPy's matrix square root of the covariances' product
  (`scipy.linalg.sqrtm`, as pytorch-fid evaluates the formula in NumPy), a closed form for
  diagonal covariances, and, for 2048 features of a few images, the same trace from the singular
  values of the centred features' cross product (`fid_by_singular_values`, checked against sqrtm);
- the network: pytorch-fid 0.3.0's own `fid_inception_v3()` (torchvision's `Inception3` with
  pytorch-fid's `FIDInceptionA/C/E` blocks), through two fixtures made from it once by
  tests/data/make_pytorch_fid_fixtures.py: the names and shapes of its state dict
  (tests/data/pytorch_fid_inception_keys.txt: the keys of the published
  `pt_inception-2015-12-05-6726825d.pth`, which pytorch-fid loads strictly) and its features of
  two images under seeded weights (tests/data/pytorch_fid_features.npy).
The published weights are not needed: a randomly initialised network runs all of the plumbing.
"""
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from hvae_nb.configs import ConfigError
from hvae_nb.data import DataError, ImageSet, random_subset
from hvae_nb.fid import (FID_WEIGHTS_FILE, FIDInception, as_8_bit, fid_score, frechet_distance,
                         load_inception, seeded_weights)

DATA = Path(__file__).resolve().parent / 'data'


def fid_by_sqrtm(real: np.ndarray, generated: np.ndarray) -> float:
    "The Fréchet distance as pytorch-fid evaluates it: NumPy moments, SciPy's sqrtm of the product."
    mu_r, mu_g = real.mean(0), generated.mean(0)
    sigma_r, sigma_g = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_r @ sigma_g).real
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(sigma_r + sigma_g - 2 * root))


def fid_by_singular_values(real: np.ndarray, generated: np.ndarray) -> float:
    """The Fréchet distance for fewer images than features. With Σ_r = A Aᵀ and Σ_g = B Bᵀ (A, B:
    the centred features over √(n - 1), features x images), the non-zero eigenvalues of Σ_r Σ_g
    are those of (AᵀB)(AᵀB)ᵀ, so Tr (Σ_r Σ_g)^½ is the sum of AᵀB's singular values: a small SVD
    in place of the square root of a 2048 x 2048 matrix."""
    a = (real - real.mean(0)) / np.sqrt(len(real) - 1)
    b = (generated - generated.mean(0)) / np.sqrt(len(generated) - 1)
    mean_term = ((real.mean(0) - generated.mean(0)) ** 2).sum()
    root_trace = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(mean_term + (a ** 2).sum() + (b ** 2).sum() - 2 * root_trace)


def with_moments(mean: np.ndarray, variances: np.ndarray, count: int, seed: int) -> np.ndarray:
    "`count` vectors whose sample mean is `mean` and sample covariance diag(`variances`), exactly."
    z = np.random.default_rng(seed).standard_normal((count, len(mean)))
    z -= z.mean(0)
    whitening = np.linalg.inv(np.linalg.cholesky(z.T @ z / (count - 1))).T
    return z @ whitening * np.sqrt(variances) + mean


def test_frechet_distance_matches_scipy_and_a_closed_form():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24))
    generated = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) + 0.3
    measured = frechet_distance(torch.from_numpy(real), torch.from_numpy(generated))
    assert measured == pytest.approx(fid_by_sqrtm(real, generated), rel=1e-8)
    # the low-rank reference used below agrees with sqrtm with fewer images than features
    few_real, few_generated = real[:10], generated[:15]
    assert (fid_by_singular_values(few_real, few_generated)
            == pytest.approx(fid_by_sqrtm(few_real, few_generated), rel=1e-6))
    # diagonal covariances: |mu_r - mu_g|^2 + sum (sqrt a - sqrt b)^2, with exact sample moments
    (mean_r, mean_g), (var_r, var_g) = rng.standard_normal((2, 8)), rng.uniform(.1, 3, (2, 8))
    closed_form = ((mean_r - mean_g) ** 2).sum() + ((np.sqrt(var_r) - np.sqrt(var_g)) ** 2).sum()
    measured = frechet_distance(torch.from_numpy(with_moments(mean_r, var_r, 300, 1)),
                                torch.from_numpy(with_moments(mean_g, var_g, 200, 2)))
    assert measured == pytest.approx(closed_form, rel=1e-9)


def pytorch_fid_shapes() -> dict[str, tuple]:
    lines = (DATA / 'pytorch_fid_inception_keys.txt').read_text().splitlines()
    listed = [line.split() for line in lines if line and not line.startswith('#')]
    return {name: tuple(int(n) for n in shape.split(',') if n != '-') for name, shape in listed}


def test_state_dict_names_and_shapes_are_pytorch_fids():
    "The names and shapes of pytorch-fid's FID Inception-v3 state dict (from pytorch-fid 0.3.0)."
    expected = pytorch_fid_shapes()
    assert len(expected) == 566
    ours = {name: tuple(tensor.shape) for name, tensor in FIDInception().state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert ours == expected


def test_features_are_pytorch_fids_on_the_same_weights():
    "The same seeded weights and two images: pytorch-fid's InceptionV3 gave the stored features."
    network = FIDInception()
    network.load_state_dict(seeded_weights(pytorch_fid_shapes()), strict=False)
    images = np.random.default_rng(1000).uniform(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad(): features = network(torch.from_numpy(images))
    expected = torch.from_numpy(np.load(DATA / 'pytorch_fid_features.npy'))
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_grey_images_are_read_as_three_equal_channels():
    network = FIDInception(resize_to=75)
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(network(grey), network(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match='1 or 3'): network(torch.rand(2, 2, 28, 28))
    with pytest.raises(ConfigError, match='75'): FIDInception(resize_to=32)


def test_the_network_stays_in_eval_mode():
    network = FIDInception(resize_to=75)
    network.train()
    assert not any(module.training for module in network.modules())
    assert not any(p.requires_grad for p in network.parameters())


def test_weights_round_trip_through_load_inception(tmp_path):
    torch.manual_seed(3)
    network = FIDInception()
    path = tmp_path / FID_WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    loaded = load_inception(path, resize_to=75)
    assert loaded.resize_to == 75
    for name, tensor in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # files saved before PyTorch 0.4.1 have no batch-norm step counters: they load too
    torch.save({k: v for k, v in network.state_dict().items() if 'num_batches_tracked' not in k},
               path)
    reloaded = load_inception(path, resize_to=75)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): assert torch.equal(reloaded(images), loaded(images))


class Pickled:
    "A class: torch.load(weights_only=True) must refuse to build it."


EXPECTED_WORDS = {'none': FID_WEIGHTS_FILE, 'absent': 'do not exist',
                  'text': 'cannot be read safely', 'object': 'cannot be read safely',
                  'not_a_dict': 'not a state dict',
                  'other_network': "'Conv2d_1a_3x3.conv.weight' is missing",
                  'extra_key': "'AuxLogits.fc.weight' is not the network's",
                  'reshaped': "'fc.weight' has shape (10, 2048)"}


@pytest.mark.parametrize('case', sorted(EXPECTED_WORDS))
def test_bad_inception_files_give_one_line_naming_the_path(tmp_path, case):
    weights = FIDInception().state_dict()
    path = tmp_path / 'weights.pth'
    if case == 'text': path.write_text('not weights\n')
    elif case == 'object': path.write_bytes(pickle.dumps({'fc.weight': Pickled()}, protocol=2))
    elif case == 'not_a_dict': torch.save([torch.zeros(3)], path)
    elif case == 'other_network': torch.save({'conv.weight': torch.zeros(3, 3, 3, 3)}, path)
    elif case == 'extra_key':
        torch.save({**weights, 'AuxLogits.fc.weight': torch.zeros(1000, 768)}, path)
    elif case == 'reshaped': torch.save({**weights, 'fc.weight': torch.zeros(10, 2048)}, path)
    with pytest.raises(DataError) as raised: load_inception(None if case == 'none' else path)
    message = str(raised.value)
    assert '\n' not in message and EXPECTED_WORDS[case] in message, message
    if case != 'none': assert str(path) in message


class Replay(nn.Module):
    "A stand-in model whose samples are given images, in order; it records its mode at each draw."
    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images, self.drawn, self.modes = images, 0, []

    def sample(self, n: int, temperature=1.0) -> torch.Tensor:
        self.modes.append(self.training)
        self.drawn += n
        return self.images[self.drawn - n:self.drawn]


def test_fid_score_of_a_set_with_itself_is_zero_and_of_another_the_reference():
    "With a random network: the samples and the seeded subset reach the statistics, once each."
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(12, 1, 8, 8, generator=generator) * 255).to(torch.uint8)
    images, count, network = ImageSet(pixels.numpy()), 7, FIDInception(resize_to=75)
    chosen = random_subset(images, count, seed=5)[:]
    itself = Replay(chosen)
    itself.train()
    same = fid_score(itself, images, count, network, batch_size=3, seed=5)
    assert itself.modes == [False, False, False] and itself.training and itself.drawn == count
    other = fid_score(Replay(1 - chosen), images, count, network, batch_size=4, seed=5)
    with torch.no_grad():
        real = network(as_8_bit(chosen)).double().numpy()
        generated = network(1 - chosen).double().numpy()
    reference = fid_by_singular_values(real, generated)
    assert reference > 0 and other['fid'] == pytest.approx(reference, rel=1e-3)
    assert abs(same['fid']) < 1e-4 * reference
    summary = other['count'], other['seed'], other['resize_to'], other['inception_sha256']
    assert summary == (count, 5, 75, None)


def test_fid_score_refuses_bad_counts_and_missing_weights_before_sampling(tmp_path):
    images, model = torch.rand(5, 1, 8, 8), Replay(torch.rand(5, 1, 8, 8))
    network = FIDInception(resize_to=75)
    with pytest.raises(ConfigError, match='at least 2'): fid_score(model, images, 1, network)
    with pytest.raises(ConfigError, match='only 5'): fid_score(model, images, 6, network)
    with pytest.raises(DataError, match='do not exist'):
        fid_score(model, images, 4, tmp_path / 'absent.pth')
    assert model.drawn == 0


def test_the_evaluator_scores_fid_with_the_weights_it_is_given(tmp_path, monkeypatch, capsys):
    "`python -m hvae_nb.evaluate RUN --fid N --inception PATH`: kept in eval.json; bad options are one line."
    import json, subprocess, sys
    from hvae_nb import evaluate as evaluate_module
    from hvae_nb.runs import Run
    from hvae_nb.train import main as train_main
    run_dir = tmp_path / 'run'
    train_main(['--preset', 'vae_digits', '--max-steps', '20', '--no-progress', '--out', str(run_dir),
                '--override', 'eval_every=1000', 'final_eval_samples=2'])
    weights = tmp_path / 'inception.pth'
    torch.manual_seed(0)
    torch.save(FIDInception(resize_to=75).state_dict(), weights)
    # the published network resizes to 299 px; a check of the plumbing reads the same file at 75 px
    monkeypatch.setattr(evaluate_module, 'load_inception', lambda path: load_inception(path, resize_to=75))
    result = evaluate_module.evaluate_command(str(run_dir), k=2, max_examples=20, no_figures=True, fid=12,
                                              inception=str(weights), no_progress=True)
    assert 'FID' in capsys.readouterr().out
    kept = Run.open(run_dir).evaluations()[result['name']]['fid']
    assert kept['count'] == 12 and kept['inception'] == str(weights) and len(kept['inception_sha256']) == 64
    # the same number as fid_score on the whole test split, the same seed and weights
    model = Run.open(run_dir).model()
    images = evaluate_module.evaluation_images(Run.open(run_dir).preset, 'test', None, 0)[0]
    assert kept['fid'] == pytest.approx(fid_score(model, images, 12, load_inception(weights, resize_to=75))['fid'],
                                        rel=1e-6)
    before = (run_dir / Run.EVALUATIONS).read_bytes()
    for options, message in ((['--fid', '12'], '--fid needs --inception PATH'),
                             (['--fid', '1', '--inception', str(weights)], '--fid must be 0 (off) or at least 2'),
                             (['--fid', '5000', '--inception', str(weights)], 'the test split holds only 297'),
                             (['--fid', '12', '--inception', str(tmp_path / 'nowhere.pth')], 'nowhere.pth')):
        done = subprocess.run([sys.executable, '-m', 'hvae_nb.evaluate', str(run_dir), '--k', '2', '--no-progress',
                               *options], capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (options, done.stderr[-800:])
    assert (run_dir / Run.EVALUATIONS).read_bytes() == before
