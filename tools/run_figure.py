"""The picture of a finished long run that a chapter shows as an image: samples and reconstructions of a trained
model, labelled as what they are (Bernoulli means, not binary draws, for binary data).

    python tools/run_figure.py RUN_DIR nbs/images/NAME.png [--count 16] [--seed 0]

The chapters cannot train for half an hour on every "Run All", so a long run's figure is made once by this script
from its run directory and committed under nbs/images/ beside the text that states the run's numbers.
"""
import argparse, sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import torch

from hvae_nb.data import random_subset, show_images
from hvae_nb.evaluate import evaluation_images
from hvae_nb.runs import Run
from hvae_nb.vae import evaluating


def run_figure(run_dir: Path, out: Path, count: int = 16, seed: int = 0):
    run = Run.open(run_dir)
    preset, model = run.preset, run.model()
    images, _ = evaluation_images(preset, 'test', None, seed)
    chosen = random_subset(images, count, seed)[:]   # float images
    binary = preset.model.likelihood == 'bernoulli'
    what = 'Bernoulli means' if binary else 'samples of the mixture'
    with evaluating(model), torch.no_grad():
        torch.manual_seed(seed)
        samples = model.sample(2 * count, 1.0).float()
        torch.manual_seed(seed)
        reconstructions = model.reconstruct(chosen).float()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.0), gridspec_kw=dict(width_ratios=[1, 1]))
    show_images(samples, nrow=count // 2, ax=axes[0],
                title=f'from the prior: {what} of p(x | z), z ~ p(z)')
    show_images(torch.cat([chosen[:count // 2], reconstructions[:count // 2],
                           chosen[count // 2:], reconstructions[count // 2:]]), nrow=count // 2, ax=axes[1],
                title=f'test images (rows 1, 3); {what} of p(x | z), z the mean of q(z | x) (rows 2, 4)')
    for ax in axes: ax.title.set_fontsize(9)
    # the run's evaluation with the most importance samples, if it has one
    evaluation = max(run.evaluations().values(), key=lambda e: e.get('k', 0), default=None)
    if evaluation:
        fig.suptitle(f"{preset.name}: test IW-NLL {evaluation['nll_nats']:.2f} nats (k = {evaluation['k']}, "
                     f"{evaluation['num_examples']} of {evaluation['split_size']} test images)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches='tight')
    print(f'wrote {out}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('run_dir', type=Path)
    parser.add_argument('out', type=Path)
    parser.add_argument('--count', type=int, default=16)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    run_figure(args.run_dir, args.out, args.count, args.seed)
