"""The discretized logistic mixture's sampler against its own likelihood (chapter 00).

The sampling frequencies of every level are compared with exp(log_prob) by Pearson's chi-square test (scipy's, not
the chapter's helper), on parameters that put the mass on interior levels, where a wrong sampler shows. A control
sampler that floors each draw to the level below, instead of rounding it to the nearest, must fail the same test:
otherwise the test could not tell a right sampler from a wrong one.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # test the working tree even when the package is not pip-installed

from hvae_nb.distributions import DiscretizedLogisticMixture  # noqa: E402


class FlooringSampler(DiscretizedLogisticMixture):
    "The control: every logistic draw goes to the level below it, not to the nearest level."
    def _snap(self, value):
        return 2 * (torch.floor((value.clamp(-1, 1) + 1) / 2 * self.levels) / self.levels) - 1


def grey_params(levels: int, weights, centres, scales) -> torch.Tensor:
    "Raw parameters (1, 3M, 1, 1) of chapter 00's grey layout; centres and scales in levels."
    logits, rest = [], []
    for weight, centre, scale in zip(weights, centres, scales):
        log_scale = math.log(2 * scale / levels)                   # scale on [-1, 1]
        logits.append(math.log(weight))
        rest += [2 * centre / levels - 1, 5 * math.atanh((log_scale + 2) / 5)]   # soft_clamp - 2
    return torch.tensor(logits + rest).view(1, -1, 1, 1)


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    "Pearson's test of `counts` against N * `probabilities`, the cells expected < 5 times pooled."
    n = counts.sum().item()
    expected = (n * probabilities / probabilities.sum()).double().numpy()
    observed = counts.double().numpy()
    kept = expected >= 5
    f_obs = list(observed[kept]) + [observed[~kept].sum()]
    f_exp = list(expected[kept]) + [expected[~kept].sum()]
    if f_exp[-1] < 5:   # too little mass outside: fold the pooled cell into the smallest kept cell
        smallest = min(range(len(f_exp) - 1), key=f_exp.__getitem__)
        f_obs[smallest] += f_obs.pop()
        f_exp[smallest] += f_exp.pop()
    return stats.chisquare(f_obs, f_exp).pvalue


def level_test(likelihood, params, seed: int, draws: int = 100_000) -> float:
    "The chi-square p-value of `draws` samples of one grey pixel against exp(log_prob) of its levels."
    levels = torch.arange(likelihood.levels + 1) / likelihood.levels
    with torch.no_grad():
        log_p = likelihood.log_prob(params.expand(len(levels), -1, -1, -1), levels.view(-1, 1, 1, 1))
        torch.manual_seed(seed)
        x = likelihood.sample(params.expand(draws, -1, -1, -1)).flatten()
    k = torch.round(x * likelihood.levels)
    assert torch.allclose(k, x * likelihood.levels)                  # on the levels
    counts = torch.bincount(k.long(), minlength=len(levels))
    return chi_square_p_value(counts, log_p.double().exp())


# chapter 00's readable mixture: three interior components, nothing in the edge bins
READABLE = dict(weights=[0.3, 0.5, 0.2], centres=[60.3, 130.6, 200.0], scales=[3.0, 6.0, 1.5])


def test_probabilities_of_the_readable_mixture_are_interior_and_sum_to_one():
    likelihood = DiscretizedLogisticMixture(3)
    params = grey_params(255, **READABLE)
    levels = torch.arange(256) / 255
    p = likelihood.log_prob(params.expand(256, -1, -1, -1), levels.view(-1, 1, 1, 1)).double().exp()
    assert abs(p.sum().item() - 1) < 1e-5
    assert p[0] + p[-1] < 1e-6


@pytest.mark.parametrize('seed', range(10))
def test_rounding_sampler_passes_and_flooring_sampler_fails(seed):
    params = grey_params(255, **READABLE)
    assert level_test(DiscretizedLogisticMixture(3), params, seed) > 1e-4
    assert level_test(FlooringSampler(3), params, seed) < 1e-10
