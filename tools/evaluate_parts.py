"""The importance-weighted NLL of a run on a whole split, computed in parts by separate processes (one per
core, or per machine) and combined: for evaluations too long for one process, such as k = 1000 on all
10,000 MNIST test images.

    python tools/evaluate_parts.py RUN_DIR --k 1000 --part 0 --parts 2 --channels-last
    python tools/evaluate_parts.py RUN_DIR --k 1000 --part 1 --parts 2 --channels-last
    python tools/evaluate_parts.py RUN_DIR --combine RUN_DIR/eval_parts

Part i takes every parts-th row of a seeded random order of the split, and runs the library's
`likelihood_terms` on them 100 images (`--save-every`) at a time, saving what it has after each: so
the rows done at any moment, over all parts, are a random subset of the split (never a prefix of the
label-sorted test file), and a stopped evaluation still gives an unbiased estimate. `--combine` checks
that the parts belong together and that no row was scored twice, and prints the summary
`hvae_nb.evaluate` gives (mean, standard error, -ELBO, KL per group), on all rows or on the random
subset done, writing it to PARTS_DIR/combined.json. Run a part again (same options) and it resumes after
its last save; `--max-minutes` stops it after the first save past that time.

On a CPU, eager passes of about 100 walks (`--max-batch 100`, the default here) were about twice as fast as
eager passes of 2000 for the convolutional NVAE (the caches), and `--channels-last` another 1.3 times
(chapter 12 gives the measurements)."""
import argparse, hashlib, json, sys, time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hvae_nb.evaluate import evaluation_images, load_run, summarize
from hvae_nb.runs import write_json_atomically
from hvae_nb.vae import likelihood_terms


def part_rows(size: int, part: int, parts: int, seed: int) -> torch.Tensor:
    "Part i's rows: every parts-th row of a seeded random order of the split, from the i-th."
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[part::parts]


def save_part(tensors: dict, about: dict, folder: Path, name: str) -> None:
    """The part's results so far, each file through a temporary name: a crash leaves the previous
    save, never half a file. The tensors go first, so they never hold fewer rows than the JSON's
    `done` says."""
    temporary = folder / f'.{name}.safetensors.tmp'
    save_file(tensors, temporary)
    temporary.replace(folder / f'{name}.safetensors')
    write_json_atomically(folder / f'{name}.json', about)


def file_sha256(path) -> str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_part(args) -> None:
    preset, model, weights = load_run(Path(args.run_dir), args.weights, 'cpu')
    weights_sha256 = file_sha256(weights)
    if args.channels_last: model.to(memory_format=torch.channels_last)
    images, size = evaluation_images(preset, args.split, None, args.seed, args.data_dir)
    rows = part_rows(size, args.part, args.parts, args.seed)
    out, name = Path(args.out), f'part_{args.part}_of_{args.parts}'
    out.mkdir(parents=True, exist_ok=True)
    fixed = dict(run_dir=str(Path(args.run_dir).resolve()), weights=str(weights),
                 weights_sha256=weights_sha256, k=args.k, split=args.split, split_size=size,
                 part=args.part, parts=args.parts, seed=args.seed, save_every=args.save_every,
                 compiled=args.compile, channels_last=args.channels_last, max_batch=args.max_batch,
                 of=len(rows), dims=images[0].numel(), preset=preset.name)
    began, results = time.time(), {'nll': [], 'reconstruction': [], 'kl': []}
    first, spent = 0, 0.0
    if (out / f'{name}.json').exists():     # resume where an earlier run of this part stopped
        about = json.loads((out / f'{name}.json').read_text())
        # the same weights (by content: the run may have moved), k, split and order
        differ = [key for key in ('weights_sha256', 'k', 'split', 'seed', 'save_every', 'parts')
                  if about.get(key, fixed[key]) != fixed[key]]
        if differ:
            sys.exit(f"evaluate_parts: error: {out / name}.json was written with other {differ}; "
                     f"use another --out")
        first, spent = about['done'], about['seconds']
        saved = load_file(out / f'{name}.safetensors')
        # a crash between the two files of a save leaves tensors ahead of the JSON: keep `first`
        for key in results: results[key].append(saved[key][:first])
        print(f"{name}: resuming after {first} of {len(rows)} images", flush=True)
    for start in range(first, len(rows), args.save_every):
        chosen = rows[start:start + args.save_every]
        torch.manual_seed(args.seed + 1000 * args.part + start)
        terms = likelihood_terms(model, images[chosen], args.k, args.batch_size, args.max_batch,
                                 compiled=args.compile)
        for key, value in zip(results, terms): results[key].append(value)
        done = start + len(chosen)
        tensors = {key: torch.cat(values) for key, values in results.items()}
        tensors['rows'] = rows[:done].clone()
        save_part(tensors, {**fixed, 'done': done, 'seconds': round(spent + time.time() - began, 1)},
                  out, name)
        print(f"{name}: {done} of {len(rows)} images, mean NLL so far "
              f"{tensors['nll'].double().mean():.3f} nats, {time.time() - began:.0f} s", flush=True)
        if args.max_minutes and time.time() - began > 60 * args.max_minutes: break


def combine(folder: Path) -> dict:
    abouts = [json.loads(p.read_text()) for p in sorted(folder.glob('part_*_of_*.json'))]
    if not abouts: sys.exit(f"evaluate_parts: error: no part_*_of_*.json in {folder}")
    keys = ('weights_sha256', 'k', 'split', 'parts', 'seed')
    same = {key: {a.get(key) for a in abouts} for key in keys}
    if any(len(v) > 1 for v in same.values()):
        sys.exit(f"evaluate_parts: error: the parts differ in {[k for k, v in same.items() if len(v) > 1]}")
    tensors = [load_file(folder / f"part_{a['part']}_of_{a['parts']}.safetensors") for a in abouts]
    rows = torch.cat([t['rows'] for t in tensors])
    size = abouts[0]['split_size']
    if len(abouts) != abouts[0]['parts'] or rows.unique().numel() != len(rows):
        sys.exit(f"evaluate_parts: error: {len(abouts)} of {abouts[0]['parts']} parts, "
                 f"{len(rows)} rows of which {rows.unique().numel()} distinct: every part is needed, "
                 f"and every row scored once")
    complete = len(rows) == size
    cat = lambda key: torch.cat([t[key] for t in tensors])
    result = dict(preset=abouts[0]['preset'], run_dir=abouts[0]['run_dir'], k=abouts[0]['k'],
                  split=abouts[0]['split'], num_examples=len(rows), split_size=size,
                  complete=complete, parts=len(abouts),
                  seconds_per_part=[a['seconds'] for a in abouts],
                  **summarize(cat('nll'), cat('reconstruction'), cat('kl'), abouts[0]['dims']))
    write_json_atomically(folder / 'combined.json', result)
    print(f"{result['preset']}: {result['split']} NLL {result['nll_nats']:.2f} nats "
          f"(standard error {result['nll_standard_error_nats']:.2f}; "
          f"{result['nll_bits_per_dim']:.4f} bits/dim), -ELBO {result['neg_elbo_nats']:.2f}, "
          f"IW k={result['k']} on " + (f"all {size}" if complete else
                                         f"a seeded random {len(rows)} of {size} (not finished)")
          + f" images, in {len(abouts)} parts")
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
    parser.add_argument('--max-batch', type=int, default=100)
    parser.add_argument('--save-every', type=int, default=100, help='images between saves')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--max-minutes', type=float, default=0,
                        help='stop after the first save past this time (0: no limit); rerun to resume')
    parser.add_argument('--combine', default=None, metavar='PARTS_DIR')
    args = parser.parse_args(argv)
    if args.combine: return combine(Path(args.combine))
    if not 0 <= args.part < args.parts: parser.error(f"--part must be in 0..{args.parts - 1}")
    args.out = args.out or str(Path(args.run_dir) / 'eval_parts')
    run_part(args)


if __name__ == '__main__': main()
