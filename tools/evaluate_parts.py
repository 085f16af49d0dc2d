"""The importance-weighted NLL of a run on a whole split, computed in parts by separate processes (one per
core, or per machine) and combined: for evaluations too long for one process, such as k = 1000 on all
10,000 MNIST test images.

    python tools/evaluate_parts.py RUN_DIR --k 1000 --part 0 --parts 2 --out PARTS_DIR --compile
    python tools/evaluate_parts.py RUN_DIR --k 1000 --part 1 --parts 2 --out PARTS_DIR --compile
    python tools/evaluate_parts.py RUN_DIR --combine PARTS_DIR

Part i takes the i-th contiguous slice of the split (the test rows in the file's order; the parts together
are every row exactly once, so the order does not bias the mean) and runs the library's `likelihood_terms`
on it, seeded by `seed + i`. `--combine` checks that every row was scored exactly once, with the same run,
weights and k, and prints the summary `hvae_nb.evaluate` gives (mean, standard error, -ELBO, KL per
group), writing it to PARTS_DIR/combined.json."""
import argparse, json, sys, time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hvae_nb.evaluate import evaluation_images, load_run, summarize
from hvae_nb.vae import likelihood_terms


def part_slice(size: int, part: int, parts: int) -> slice:
    return slice(size * part // parts, size * (part + 1) // parts)


def run_part(args) -> None:
    preset, model, weights = load_run(Path(args.run_dir), args.weights, 'cpu')
    images, size = evaluation_images(preset, args.split, None, args.seed, args.data_dir)
    rows = part_slice(size, args.part, args.parts)
    began = time.time()
    torch.manual_seed(args.seed + args.part)
    nll, reconstruction, kl = likelihood_terms(model, images[rows], args.k, args.batch_size,
                                               args.max_batch, progress=True, compiled=args.compile)
    seconds = time.time() - began
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f'part_{args.part}_of_{args.parts}'
    save_file(dict(nll=nll, reconstruction=reconstruction, kl=kl,
                   rows=torch.arange(size)[rows]), out / f'{name}.safetensors')
    about = dict(run_dir=str(Path(args.run_dir).resolve()), weights=str(weights), k=args.k,
                 split=args.split, split_size=size, part=args.part, parts=args.parts,
                 seed=args.seed + args.part, compiled=args.compile, seconds=round(seconds, 1),
                 dims=images[0].numel(), preset=preset.name)
    (out / f'{name}.json').write_text(json.dumps(about, indent=1))
    print(f"{name}: {len(nll)} images, mean NLL {nll.double().mean():.3f} nats, {seconds:.0f} s")


def combine(folder: Path) -> dict:
    abouts = [json.loads(p.read_text()) for p in sorted(folder.glob('part_*_of_*.json'))]
    if not abouts: sys.exit(f"evaluate_parts: error: no part_*_of_*.json in {folder}")
    same = {key: {a[key] for a in abouts} for key in ('run_dir', 'weights', 'k', 'split', 'parts')}
    if any(len(v) > 1 for v in same.values()):
        sys.exit(f"evaluate_parts: error: the parts differ in {[k for k, v in same.items() if len(v) > 1]}")
    tensors = [load_file(folder / f"part_{a['part']}_of_{a['parts']}.safetensors") for a in abouts]
    rows = torch.cat([t['rows'] for t in tensors])
    size = abouts[0]['split_size']
    if len(rows) != size or not torch.equal(rows.sort().values, torch.arange(size)):
        sys.exit(f"evaluate_parts: error: the parts cover {rows.unique().numel()} of {size} rows, "
                 f"{len(rows)} times in all: every row must be scored exactly once")
    cat = lambda key: torch.cat([t[key] for t in tensors])
    result = dict(preset=abouts[0]['preset'], run_dir=abouts[0]['run_dir'], k=abouts[0]['k'],
                  split=abouts[0]['split'], num_examples=size, parts=len(abouts),
                  seconds_per_part=[a['seconds'] for a in abouts],
                  **summarize(cat('nll'), cat('reconstruction'), cat('kl'), abouts[0]['dims']))
    (folder / 'combined.json').write_text(json.dumps(result, indent=1))
    print(f"{result['preset']}: {result['split']} NLL {result['nll_nats']:.2f} nats "
          f"(standard error {result['nll_standard_error_nats']:.2f}; "
          f"{result['nll_bits_per_dim']:.4f} bits/dim), -ELBO {result['neg_elbo_nats']:.2f}, "
          f"IW k={result['k']} on all {size} images in {len(abouts)} parts")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('run_dir')
    parser.add_argument('--k', type=int, default=1000)
    parser.add_argument('--part', type=int, default=0)
    parser.add_argument('--parts', type=int, default=1)
    parser.add_argument('--out', default=None, help='folder for the parts (default RUN_DIR/eval_parts)')
    parser.add_argument('--split', default='test', choices=('test', 'train'))
    parser.add_argument('--weights', default='model.safetensors')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--batch-size', type=int, default=100)
    parser.add_argument('--max-batch', type=int, default=2048)
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--combine', default=None, metavar='PARTS_DIR')
    args = parser.parse_args(argv)
    if args.combine: return combine(Path(args.combine))
    if not 0 <= args.part < args.parts: parser.error(f"--part must be in 0..{args.parts - 1}")
    args.out = args.out or str(Path(args.run_dir) / 'eval_parts')
    run_part(args)


if __name__ == '__main__': main()
