"""Our NVAE beside the official NVlabs/NVAE code, on this machine.

Run it against a checkout of https://github.com/NVlabs/NVAE (nothing of it is in this repository;
its modules are imported from the path given, and NVIDIA's licence forbids copying them here):

    OMP_NUM_THREADS=1 python tools/compare_nvae_official.py --official /path/to/NVAE \\
        [--parts counts forward scorer timing fixture] [--rounds 3] [--threads 1]

What it measures, part by part (`--parts`, default all but `fixture`):

- **counts**: the official `AutoEncoder` of every configuration in the official README (its
  commands' flags, parsed by the official train.py's own argument parser, so every default is
  the official one), built on the CPU: its parameter count, its state_dict's key count (the
  aliases `….weight_normalized` included), and ours for the preset of the same configuration.
- **forward**: an official model given random weights (every parameter and batch-norm statistic
  that the official initialisation makes constant gets random values), saved exactly as train.py
  saves a checkpoint, converted by `python -m hvae_nb.convert nvae` in a subprocess, and both
  models scoring the same images in evaluation mode under the same noise (each side seeded alike
  before its walk; both draw one standard normal tensor per group, top-down): log p(x|z), the
  KL of every group and the ELBO, in nats per image. For MNIST and CIFAR-10 (with flows) at the
  README's sizes, and for the 5-bit CelebA-HQ-256 command at reduced channels (see
  `FIVE_BIT_CHANGES`) so that it runs in seconds on a CPU.
- **scorer**: the official `DiscMixLogistic.log_prob` against ours on the same parameters and
  8-bit images: the official scorer sends level 254 to the top bin (it tests x > 0.99 on [-1, 1]),
  so its probabilities over the 256 levels of a pixel sum to more than 1; printed in nats per
  image, and the sum over the 256 levels of one pixel's official probabilities.
- **timing**: one training step of each side, float32, on the same batch, interleaved in one
  process: forward, KL balancing (KL weight 0.5, so balancing is on), the spectral and batch-norm
  penalties, backward and Adamax. The official step is train.py's `train` loop body without its
  mixed precision, distributed averaging and logging, with the official fast Adamax; ours is the
  trainer's `train_step`. Median seconds per step over `--rounds`, the bytes one forward pass
  keeps for the backward pass, and the peak RSS of a fresh process holding one side (`--only`).
  For `nvae_mnist_hour` at batch 64 and `nvae_mnist` at batch 8.
- **fixture**: writes tests/data/nvae_official.json.gz: the official state_dict's key names and
  shapes of every README configuration and of a small one (`SMALL`), and the official model's
  output for the small one on fixed weights and images, for tests/test_convert_nvae_official.py.

The official code needs CUDA, apex-free but CUDA-only batch norms, tensorboardX, torchvision and
lmdb to import and run; the run-time stand-ins below replace only what a CPU cannot run, in this
process (a `tensorboardX` module written to a temporary directory, `Tensor.cuda` as the identity,
the official synchronised batch norms as their own single-process path, `F.batch_norm`), and stub
modules for the data and FID imports of train.py while its argument parser runs.
"""
import argparse, contextlib, gzip, io, json, math, os, statistics, subprocess, sys, tempfile
import time, types
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hvae_nb.bench import device_name, max_rss_bytes, proc_status_bytes  # noqa: E402
from hvae_nb.convert import nvae_config, nvae_preset  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.runs import from_pretrained  # noqa: E402

FIXTURE = REPO / 'tests' / 'data' / 'nvae_official.json.gz'

# The README's training commands (NVlabs/NVAE, "Running the main NVAE training and evaluation
# scripts"), without the paths and the multi-node addresses.
README_COMMANDS = {
    'mnist': """--dataset mnist --batch_size 200 --epochs 400 --num_latent_scales 2
        --num_groups_per_scale 10 --num_postprocess_cells 3 --num_preprocess_cells 3
        --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2 --num_latent_per_group 20
        --num_preprocess_blocks 2 --num_postprocess_blocks 2 --weight_decay_norm 1e-2
        --num_channels_enc 32 --num_channels_dec 32 --num_nf 0 --ada_groups
        --num_process_per_node 2 --use_se --res_dist --fast_adamax""",
    'cifar10': """--dataset cifar10 --num_channels_enc 128 --num_channels_dec 128 --epochs 400
        --num_postprocess_cells 2 --num_preprocess_cells 2 --num_latent_scales 1
        --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2
        --num_preprocess_blocks 1 --num_postprocess_blocks 1 --num_groups_per_scale 30
        --batch_size 32 --weight_decay_norm 1e-2 --num_nf 1 --num_process_per_node 8 --use_se
        --res_dist --fast_adamax""",
    'celeba_64': """--dataset celeba_64 --num_channels_enc 64 --num_channels_dec 64 --epochs 90
        --num_postprocess_cells 2 --num_preprocess_cells 2 --num_latent_scales 3
        --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2
        --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-1
        --num_groups_per_scale 20 --batch_size 16 --num_nf 1 --ada_groups
        --num_process_per_node 8 --use_se --res_dist --fast_adamax""",
    'imagenet_32': """--dataset imagenet_32 --num_channels_enc 192 --num_channels_dec 192
        --epochs 45 --num_postprocess_cells 2 --num_preprocess_cells 2 --num_latent_scales 1
        --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2
        --num_preprocess_blocks 1 --num_postprocess_blocks 1 --num_groups_per_scale 28
        --batch_size 24 --num_nf 1 --warmup_epochs 1 --weight_decay_norm 1e-2
        --weight_decay_norm_anneal --weight_decay_norm_init 1e0 --num_process_per_node 8
        --use_se --res_dist --fast_adamax --num_proc_node 3""",
    'celeba_256': """--dataset celeba_256 --num_channels_enc 30 --num_channels_dec 30 --epochs 300
        --num_postprocess_cells 2 --num_preprocess_cells 2 --num_latent_scales 5
        --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2
        --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-2
        --num_groups_per_scale 16 --batch_size 4 --num_nf 2 --ada_groups
        --min_groups_per_scale 4 --weight_decay_norm_anneal --weight_decay_norm_init 1.
        --num_process_per_node 8 --use_se --res_dist --fast_adamax --num_x_bits 5
        --num_proc_node 3""",
    'ffhq': """--dataset ffhq --num_channels_enc 30 --num_channels_dec 30 --epochs 200
        --num_postprocess_cells 2 --num_preprocess_cells 2 --num_latent_scales 5
        --num_latent_per_group 20 --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2
        --num_preprocess_blocks 1 --num_postprocess_blocks 1 --weight_decay_norm 1e-1
        --num_groups_per_scale 16 --batch_size 4 --num_nf 2 --ada_groups
        --min_groups_per_scale 4 --weight_decay_norm_anneal --weight_decay_norm_init 1.
        --num_process_per_node 8 --use_se --res_dist --fast_adamax --num_x_bits 5
        --learning_rate 8e-3 --num_proc_node 3""",
}
PRESETS = {'mnist': 'nvae_mnist', 'cifar10': 'nvae_cifar10', 'celeba_64': 'nvae_celeba64',
           'imagenet_32': 'nvae_imagenet32', 'celeba_256': 'nvae_celebahq256',
           'ffhq': 'nvae_ffhq256'}
# A small MNIST model with flows, for the fixture's recorded output (tests run it in a second).
SMALL = """--dataset mnist --num_channels_enc 8 --num_channels_dec 12 --num_latent_per_group 4
    --num_latent_scales 2 --num_groups_per_scale 4 --ada_groups --num_preprocess_blocks 1
    --num_preprocess_cells 2 --num_postprocess_blocks 1 --num_postprocess_cells 2
    --num_cell_per_cond_enc 2 --num_cell_per_cond_dec 2 --num_nf 1 --weight_decay_norm 1e-2
    --use_se --res_dist --fast_adamax"""
# CelebA-HQ-256's command at 8 instead of 30 channels, 4 latent channels and 64 x 64 images
# (--dataset celeba_64: the official code takes the image size from the dataset's name): its five
# latent scales (36 groups), two flow pairs per group and 5-bit likelihood, at a size a CPU runs
# in seconds; converted with --preset nvae_celebahq256 and overrides.
FIVE_BIT_CHANGES = '--num_channels_enc 8 --num_channels_dec 8 --num_latent_per_group 4'
FIVE_BIT_SIZE = 64


# --- the official code, imported from the checkout, with run-time stand-ins -------------------

def import_official(path: str) -> types.SimpleNamespace:
    "The official modules `model`, `utils`, `distributions` and `thirdparty.adamax`, CPU-ready."
    root = str(Path(path).resolve())
    if not Path(root, 'model.py').exists():
        sys.exit(f"compare_nvae_official: {root} holds no model.py: not a checkout of NVlabs/NVAE")
    sys.path.insert(0, root)
    try:
        import tensorboardX  # noqa: F401
    except ImportError:          # imported by utils.py for its Writer, which we do not use
        stand_ins = tempfile.mkdtemp(prefix='nvae_stand_ins_')
        Path(stand_ins, 'tensorboardX.py').write_text(
            'class SummaryWriter:\n    def __init__(self, *args, **kwargs): pass\n')
        sys.path.insert(0, stand_ins)
    if not torch.cuda.is_available():   # the official code moves masks and noise with .cuda()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    import model, utils, distributions, neural_operations
    from thirdparty import adamax, inplaced_sync_batchnorm, swish

    # The official batch norms are synchronised across GPUs; with one process their own code
    # falls back to F.batch_norm (plus Swish for SyncBatchNormSwish), which is what runs here.
    def batch_norm(bn, x):
        if bn.training: bn.num_batches_tracked.add_(1)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training,
                            bn.momentum, bn.eps)
    inplaced_sync_batchnorm.SyncBatchNormSwish.forward = (
        lambda self, x: swish.Swish.apply(batch_norm(self, x)))
    neural_operations.SyncBatchNorm.forward = lambda self, x: batch_norm(self.bn, x)
    return types.SimpleNamespace(root=root, model=model, utils=utils,
                                 distributions=distributions, adamax=adamax)


class _Parsed(Exception):
    def __init__(self, namespace): self.namespace = namespace


def official_args(official, command: str) -> argparse.Namespace:
    """The `args` the official train.py makes of `command`: its own parser runs (train.py as
    __main__, stopped right after `parse_args`), so every flag a command leaves out has the
    official default."""
    stubs = {'datasets': types.ModuleType('datasets'), 'fid': types.ModuleType('fid'),
             'fid.fid_score': types.ModuleType('fid.fid_score'),
             'fid.inception': types.ModuleType('fid.inception')}
    for name in ('compute_statistics_of_generator', 'load_statistics',
                 'calculate_frechet_distance'):
        setattr(stubs['fid.fid_score'], name, None)
    stubs['fid.inception'].InceptionV3 = None
    saved = {name: sys.modules.get(name) for name in stubs}
    parse_args = argparse.ArgumentParser.parse_args
    def capture(self, args=None, namespace=None): raise _Parsed(parse_args(self, args, namespace))
    argv = sys.argv
    sys.modules.update(stubs)
    argparse.ArgumentParser.parse_args = capture
    sys.argv = ['train.py', *command.split()]
    try:
        import runpy
        runpy.run_path(str(Path(official.root, 'train.py')), run_name='__main__')
    except _Parsed as parsed:
        return parsed.namespace
    finally:
        argparse.ArgumentParser.parse_args = parse_args
        sys.argv = argv
        for name, module in saved.items():
            if module is None: sys.modules.pop(name, None)
            else: sys.modules[name] = module
    raise RuntimeError("train.py never parsed its arguments")


def build_official(official, args: argparse.Namespace):
    "The official AutoEncoder of `args` (its construction prints two lines: silenced)."
    with contextlib.redirect_stdout(io.StringIO()):
        return official.model.AutoEncoder(args, None,
                                          official.utils.get_arch_cells(args.arch_instance))


def randomise(model, seed: int = 1):
    """Random values for everything the official initialisation makes constant (batch norms'
    scales, shifts and statistics, zero biases), so that a check sees every tensor in place."""
    generator = torch.Generator().manual_seed(seed)
    noise = lambda t, scale: scale * torch.randn(t.shape, generator=generator)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith('weight_normalized') or not t.is_floating_point(): continue
            if name.endswith('running_var'): t.copy_(0.5 + torch.rand(t.shape, generator=generator))
            elif name.endswith('running_mean'): t.copy_(noise(t, 0.1))
            elif (t == 0).all(): t.copy_(noise(t, 0.05))
            elif (t == 1).all(): t.add_(noise(t, 0.1))


def save_as_train_py(official, model, args, path: Path):
    """The checkpoint train.py saves at the end of an epoch (its dict, its keys, its objects), with
    the attributes train.py adds to `args` after parsing them."""
    args = argparse.Namespace(**vars(args))
    args.save, args.distributed = f'{args.root}/eval-{args.save}', True
    args.num_total_iter = 100 * args.epochs          # len(train_queue) * epochs in train.py
    optimizer = official.adamax.Adamax(model.parameters(), args.learning_rate,
                                       weight_decay=args.weight_decay, eps=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, float(args.epochs - args.warmup_epochs - 1), eta_min=args.learning_rate_min)
    with torch.no_grad(): scaler = torch.amp.GradScaler('cpu', 2 ** 10).state_dict()
    torch.save({'epoch': 1, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'global_step': 0, 'args': args, 'arch_instance':
                official.utils.get_arch_cells(args.arch_instance),
                'scheduler': scheduler.state_dict(), 'grad_scalar': scaler}, path)


def convert(checkpoint: Path, out: Path, preset: str | None = None,
            overrides: dict | None = None) -> Path:
    "`python -m hvae_nb.convert nvae CHECKPOINT --out OUT`, in a subprocess, as a user runs it."
    command = [sys.executable, '-m', 'hvae_nb.convert', 'nvae', str(checkpoint), '--out', str(out)]
    if preset: command += ['--preset', preset]
    for key, value in (overrides or {}).items(): command += ['--override', f'{key}={value}']
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if done.returncode:
        raise RuntimeError(f"convert failed: {done.stderr.strip()}")
    return out


# --- forward: the same weights, images and noise --------------------------------------------

def official_images(args, images: torch.Tensor) -> torch.Tensor:
    """Our images (B, C, H, W) on [0, 1] as the official model reads them: MNIST padded by 2 (its
    `transforms.Pad(2)`), and the bit depth of `--num_x_bits` (train.py's `utils.pre_process`)."""
    if args.dataset == 'mnist': images = F.pad(images, (2, 2, 2, 2))
    if args.num_x_bits != 8:
        images = torch.floor(images * 255 / 2 ** (8 - args.num_x_bits)) / (2 ** args.num_x_bits - 1)
    return images


def official_forward(official, model, args, x: torch.Tensor, seed: int) -> dict:
    "log p(x|z) and the KL of every group (top-down) of one official walk, per image."
    torch.manual_seed(seed)
    logits, log_q, log_p, kl_all, _ = model(x)
    output = model.decoder_output(logits)
    recon = official.utils.reconstruction_loss(output, x, crop=model.crop_output)
    return dict(log_px=-recon, kl=torch.stack(kl_all, 1))


def our_forward(model, x: torch.Tensor, seed: int) -> dict:
    "The same from our model: its trace lists groups bottom-up, turned top-down here."
    torch.manual_seed(seed)
    trace = model.trace(x)
    return dict(log_px=trace.log_px, kl=trace.kl.flip(1))


def test_images(args, batch: int, seed: int = 0) -> torch.Tensor:
    "A fixed batch for a configuration: binary digits-like noise (MNIST) or 8-bit colour noise."
    generator = torch.Generator().manual_seed(seed)
    size = {'mnist': 28, 'cifar10': 32}.get(args.dataset) or official_size(args)
    channels = 1 if args.dataset == 'mnist' else 3
    grey = torch.rand(batch, channels, size, size, generator=generator)
    if args.dataset == 'mnist': return torch.bernoulli(grey, generator=generator)
    smooth = F.avg_pool2d(F.pad(grey, (2, 2, 2, 2), mode='reflect'), 5, stride=1)
    return torch.round(smooth.clamp(0, 1) * 255) / 255


def official_size(args) -> int:
    if args.dataset == 'ffhq': return 256
    return int(args.dataset.rsplit('_', 1)[-1]) if '_' in args.dataset else 32


def compare_forward(official, name: str, args, preset=None, overrides=None, batch: int = 2,
                    seed: int = 0, work: Path | None = None) -> dict:
    """Build, randomise, save as train.py, convert with the command line, and score one batch on
    both sides in evaluation mode under the same noise. Returns the largest differences."""
    work = Path(work or tempfile.mkdtemp(prefix='nvae_compare_'))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    theirs = build_official(official, args)
    randomise(theirs, seed + 1)
    checkpoint = work / f'{name}.pt'
    save_as_train_py(official, theirs, args, checkpoint)
    began = time.perf_counter()
    ours = from_pretrained(convert(checkpoint, work / f'{name}_run', preset, overrides))
    converted_s = time.perf_counter() - began
    theirs.eval(); ours.eval()
    images = test_images(args, batch, seed)
    with torch.no_grad():
        a = official_forward(official, theirs, args, official_images(args, images), seed)
        b = our_forward(ours, images, seed)
    elbo_a, elbo_b = a['log_px'] - a['kl'].sum(1), b['log_px'] - b['kl'].sum(1)
    return dict(name=name, preset=ours.config, groups=a['kl'].shape[1], batch=batch,
                log_px=(a['log_px'], b['log_px']), kl=(a['kl'], b['kl']), elbo=(elbo_a, elbo_b),
                converted_s=converted_s)


def print_forward(result: dict):
    print(f"  {result['name']}: {result['groups']} groups, batch {result['batch']} "
          f"(converted in {result['converted_s']:.1f} s)")
    for key in ('log_px', 'elbo'):
        a, b = result[key]
        print(f"    {key:7s} official {a.tolist()}\n            ours     {b.tolist()}\n"
              f"            largest difference {(a - b).abs().max().item():.2e} nats")
    a, b = result['kl']
    worst = (a - b).abs().max().item()
    print(f"    KL      {a.shape[1]} groups, official {a.sum(1).tolist()} in total; largest "
          f"difference in any group {worst:.2e} nats (largest KL {a.abs().max().item():.1f})")


# --- counts and the fixture -------------------------------------------------------------------

def model_flags(args: argparse.Namespace) -> dict:
    "The flags of `args` that build or score the model (what a converter reads), as plain data."
    wanted = ('dataset', 'arch_instance', 'use_se', 'res_dist', 'num_x_bits', 'num_mixture_dec',
              'weight_decay_norm', 'weight_decay_norm_init', 'weight_decay_norm_anneal')
    return {k: v for k, v in vars(args).items()
            if k in wanted or k.startswith(('num_', 'ada_', 'min_'))}


def state_layout(model) -> list[list]:
    "[key, shape] of every entry of the official state_dict, in order, aliases included."
    return [[key, list(t.shape)] for key, t in model.state_dict().items()]


def parameter_count(model) -> int:
    "Parameters as train.py's `count_parameters_in_M` counts them (each tensor once)."
    return sum(p.numel() for p in model.parameters())


def fixture_tensors(layout: list, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic values for a state dict of this layout (tests/test_convert_nvae_official.py
    draws the same from the fixture): batch norms near the identity, statistics positive, every
    other tensor 0.1 N(0, 1), drawn in layout order; an alias is its weight, as the official
    Conv2D keeps them."""
    generator = torch.Generator().manual_seed(seed)
    keys = {key for key, _ in layout}
    tensors = {}
    for key, shape in layout:
        module, _, last = key.rpartition('.')
        batch_norm = f'{module}.running_mean' in keys
        if last == 'weight_normalized': tensors[key] = tensors[f'{module}.weight']
        elif last == 'num_batches_tracked': tensors[key] = torch.tensor(1000)
        elif last == 'running_var': tensors[key] = 0.5 + torch.rand(shape, generator=generator)
        elif batch_norm and last == 'weight':
            tensors[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else: tensors[key] = 0.1 * torch.randn(shape, generator=generator)
    return tensors


def fixture_images(seed: int = 0) -> torch.Tensor:
    "The two 28 x 28 binary images the fixture's recorded output is of (our layout: unpadded)."
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.bernoulli(torch.full((2, 1, 28, 28), 0.3), generator=generator)


@contextlib.contextmanager
def official_means(official):
    "The official Normal's sample as its mean (z = mu), for a walk of posterior means."
    sample = official.distributions.sample_normal_jit
    official.distributions.sample_normal_jit = lambda mu, sigma: (mu, torch.zeros_like(mu))
    try: yield
    finally: official.distributions.sample_normal_jit = sample


def record_small(official, seed: int = 0) -> dict:
    """The official small model on `fixture_tensors` and `fixture_images`, in evaluation mode, z
    the posterior means: log p(x|z) and the KL of every group, top-down, per image."""
    args = official_args(official, SMALL)
    model = build_official(official, args)
    layout = state_layout(model)
    model.load_state_dict(fixture_tensors(layout, seed))
    model.eval()
    x = official_images(args, fixture_images(seed))
    with torch.no_grad(), official_means(official):
        result = official_forward(official, model, args, x, seed)
    return dict(command=' '.join(SMALL.split()), args=model_flags(args),
                parameters=parameter_count(model), state=layout, seed=seed,
                log_px=result['log_px'].tolist(), kl=result['kl'].tolist())


def official_commit(root: str) -> str | None:
    done = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True,
                          text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def configurations(official) -> dict:
    "Every README configuration: its command, its model flags, its parameter count and layout."
    out = {}
    for name, command in README_COMMANDS.items():
        args = official_args(official, command)
        model = build_official(official, args)
        out[name] = dict(command=' '.join(command.split()), args=model_flags(args),
                         parameters=parameter_count(model), state=state_layout(model))
        del model
    return out


def print_counts(found: dict):
    print(f"  {'configuration':12s} {'official parameters':>20s} {'state_dict keys':>15s} "
          f"{'aliases':>7s}  {'our preset':18s} {'parameters':>12s}")
    for name, entry in found.items():
        aliases = sum(key.endswith('.weight_normalized') for key, _ in entry['state'])
        try:
            with torch.device('meta'): ours = get_preset(PRESETS[name]).model.build()
            mine = f"{sum(p.numel() for p in ours.parameters()):12,d}"
            mine += '' if int(mine.replace(',', '')) == entry['parameters'] else '  DIFFERENT'
        except Exception as e:                                    # a preset not in the catalogue
            mine = f"({type(e).__name__})"
        print(f"  {name:12s} {entry['parameters']:20,d} {len(entry['state']):15,d} "
              f"{aliases:7,d}  {PRESETS[name]:18s} {mine}")


def write_fixture(official, found: dict, path: Path = FIXTURE):
    data = dict(made_by='python tools/compare_nvae_official.py --official PATH --parts fixture',
                official_commit=official_commit(official.root), configurations=found,
                small=record_small(official))
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, 'wt', compresslevel=9) as f: json.dump(data, f, separators=(',', ':'))
    print(f"  wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


# --- the official scorer at level 254 ---------------------------------------------------------

def mnist_rgb(count: int) -> torch.Tensor:
    "The first `count` MNIST test digits, 8-bit grey replicated to RGB, on [0, 1]."
    from hvae_nb.data import load_mnist
    images, _ = load_mnist('test', os.environ.get('HVAE_DATA'))
    grey = torch.from_numpy(images[:count]).float().div(255).reshape(count, 1, 28, 28)
    return grey.expand(-1, 3, -1, -1).contiguous()


def fitted_mixture(images: torch.Tensor, log_scale: float, seed: int = 0) -> torch.Tensor:
    """NVAE's output layout (10 mixtures) for a decoder that predicts `images` well: every
    component's mean within N(0, 0.01) of the pixel (on [-1, 1]), log-scale `log_scale`,
    coefficients and logits 0."""
    generator = torch.Generator().manual_seed(seed)
    b, c, h, w = images.shape
    m = 10
    centre = (2 * images - 1).unsqueeze(2).expand(b, c, m, h, w)
    means = centre + 0.01 * torch.randn(centre.shape, generator=generator)
    log_scales = torch.full_like(means, log_scale)
    per_channel = torch.cat([means, log_scales, torch.zeros_like(means)], 2)   # B, 3, 3M, H, W
    return torch.cat([torch.zeros(b, m, h, w), per_channel.reshape(b, 3 * 3 * m, h, w)], 1)


def compare_scorer(official, count: int = 100):
    "The official and our 8-bit mixture scores of the same digits, and the official total mass."
    from hvae_nb.nvae import NVAELogisticMixture
    images = mnist_rgb(count)
    at_254 = (torch.round(images[:, 0] * 255) == 254).sum((1, 2)).float()
    print(f"  {count} MNIST test digits, 8-bit grey replicated to RGB: {at_254.mean():.2f} pixels "
          f"per image at level 254 (x 3 channels), {int((at_254 > 0).sum())} images with one")
    for log_scale in (-5.0, -4.0, -3.0):
        params = fitted_mixture(images, log_scale)
        theirs = official.distributions.DiscMixLogistic(params, 10, num_bits=8).log_prob(images)
        theirs = theirs.sum((1, 2))
        ours = NVAELogisticMixture(10).log_prob(params, images)
        difference = theirs - ours
        print(f"  log-scale {log_scale:+.0f}: log p(x) official {theirs.mean():.3f}, ours "
              f"{ours.mean():.3f} nats per image; official - ours {difference.mean():.3f} "
              f"(largest {difference.max():.3f}) nats per image")
    # one pixel, red's single component centred between levels 254 and 255, green and blue held
    # at level 0 with certainty: the official probabilities of the 256 red levels, summed
    levels = torch.arange(256).float() / 255
    pixel = torch.stack([levels, torch.zeros(256), torch.zeros(256)], 1).view(256, 3, 1, 1)
    means = torch.tensor([2 * 254.5 / 255 - 1, -3.0, -3.0]).view(1, 3, 1, 1, 1)
    means = means.expand(256, 3, 10, 1, 1)
    for log_scale in (-5.0, -6.0):
        scales = torch.tensor([log_scale, -7.0, -7.0]).view(1, 3, 1, 1, 1).expand_as(means)
        per_channel = torch.cat([means, scales, torch.zeros_like(means)], 2).reshape(256, 90, 1, 1)
        params = torch.cat([torch.zeros(256, 10, 1, 1), per_channel], 1)
        theirs = official.distributions.DiscMixLogistic(params, 10, num_bits=8).log_prob(pixel)
        ours = NVAELogisticMixture(10).log_prob(params, pixel)
        print(f"  one pixel, red centred at level 254.5 (log-scale {log_scale:+.0f}), green and "
              f"blue certain at 0: the 256 red levels' probabilities sum to "
              f"{theirs.exp().sum():.4f} (official), {ours.exp().sum():.4f} (ours)")


# --- a training step, official and ours -------------------------------------------------------

TIMED = (('nvae_mnist_hour', 64), ('nvae_mnist', 8))
BETA = 0.5           # the KL weight of the timed steps: below 1, so KL balancing is on


def command_of(config) -> str:
    "The official command line of our NVAE configuration (`official_flags`)."
    from hvae_nb.convert import official_flags
    words = []
    for flag, value in official_flags(config).items():
        if value is True: words.append(f'--{flag}')
        elif value is not False: words += [f'--{flag}', str(value)]
    if config.spectral_weight_start:
        words += ['--weight_decay_norm_anneal', '--weight_decay_norm_init',
                  str(config.spectral_weight_start)]
    return ' '.join(words + ['--arch_instance', 'res_mbconv', '--use_se', '--res_dist'])


def grey_batch(preset, batch: int, seed: int = 0) -> torch.Tensor:
    "Grey levels the step binarises (both sides draw a fresh binarisation per step)."
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *preset.model.image_shape, generator=generator)


def official_step(official, preset, images: torch.Tensor, seed: int = 0):
    """train.py's step on the official model of `preset`, float32: a call taking one step, and a
    call of the forward pass's loss for the memory count."""
    args = official_args(official, command_of(preset.model))
    torch.manual_seed(seed)
    model = build_official(official, args).train()
    optimizer = official.adamax.Adamax(model.parameters(), args.learning_rate,
                                       weight_decay=args.weight_decay, eps=1e-3)
    utils = official.utils
    alpha = utils.kl_balancer_coeff(num_scales=model.num_latent_scales,
                                    groups_per_scale=model.groups_per_scale, fun='square')
    weight = preset.model.spectral_weight          # lambda at KL weight BETA (no annealing here)
    padded = official_images(args, images)

    def loss():
        x = torch.bernoulli(padded) if preset.model.likelihood == 'bernoulli' else padded
        logits, log_q, log_p, kl_all, kl_diag = model(x)
        output = model.decoder_output(logits)
        recon = utils.reconstruction_loss(output, x, crop=model.crop_output)
        balanced_kl, _, _ = utils.kl_balancer(kl_all, BETA, kl_balance=True, alpha_i=alpha)
        total = torch.mean(recon + balanced_kl)
        return total + model.spectral_norm_parallel() * weight + model.batchnorm_loss() * weight

    def step():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        return value.item()
    return step, loss


def our_step(preset, images: torch.Tensor, seed: int = 0):
    "The trainer's `train_step` on our model of `preset`, float32, at KL weight BETA."
    from accelerate import Accelerator
    from hvae_nb.train import make_optimizer, train_step
    torch.manual_seed(seed)
    model = preset.model.build().train()
    train = replace(preset.train, batch_size=len(images), grad_accum=1)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, train))
    binary = preset.model.likelihood == 'bernoulli'
    prepare = torch.bernoulli if binary else (lambda x: x)     # dynamic binarisation, as the data's
    steps = iter(range(10 ** 9))

    def step():
        return train_step(model, optimizer, [images], prepare, next(steps), BETA, train,
                          accelerator)['loss']

    def loss():
        x = torch.bernoulli(images) if binary else images
        return model(x, beta=BETA).loss
    return step, loss


def saved_for_backward(loss_fn) -> int:
    "Bytes of the tensors one forward pass keeps for the backward pass (each storage once)."
    storages = {}
    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t): loss_fn()
    return sum(storages.values())


def time_steps(official, name: str, batch: int, rounds: int) -> dict:
    preset = get_preset(name)
    images = grey_batch(preset, batch)
    sides = {'official': official_step(official, preset, images),
             'ours': our_step(preset, images)}
    saved = {side: saved_for_backward(loss) for side, (_, loss) in sides.items()}
    for step, _ in sides.values(): step()                     # warm-up (40 power iterations)
    seconds = {side: [] for side in sides}
    for _ in range(rounds):
        for side, (step, _) in sides.items():
            began = time.perf_counter(); step(); seconds[side].append(time.perf_counter() - began)
    return dict(name=name, batch=batch, seconds=seconds, saved=saved)


def only(args):
    "One side in this fresh process: a warm-up and one step; prints its peak RSS as JSON."
    official = import_official(args.official) if args.only == 'official' else None
    preset = get_preset(args.preset)
    images = grey_batch(preset, args.batch_size)
    before = proc_status_bytes('VmRSS')
    step, _ = (official_step(official, preset, images) if official else our_step(preset, images))
    step(); step()
    print(json.dumps(dict(only=args.only, before_mib=before and before / 2 ** 20,
                          peak_mib=max_rss_bytes() / 2 ** 20)))


def fresh_process_rss(args, side: str, name: str, batch: int) -> dict:
    command = [sys.executable, __file__, '--official', args.official, '--only', side,
               '--preset', name, '--batch-size', str(batch), '--threads', str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
        return dict(error=f'exit status {done.returncode}: {tail}')
    return json.loads(lines[-1])


def print_timing(result: dict, rss: dict):
    med = {side: statistics.median(s) for side, s in result['seconds'].items()}
    print(f"  {result['name']}, batch {result['batch']}:")
    for side in ('official', 'ours'):
        r = rss.get(side, {})
        peak = (f"peak RSS {r['peak_mib']:,.0f} MiB (before the model {r['before_mib']:,.0f})"
                if 'peak_mib' in r else r.get('error', ''))
        print(f"    {side:8s} {med[side]:6.3f} s/step (rounds: "
              f"{', '.join(f'{v:.3f}' for v in result['seconds'][side])}); saved for backward "
              f"{result['saved'][side] / 2 ** 20:,.0f} MiB; {peak}")
    ratio_rss = ''
    if 'peak_mib' in rss.get('official', {}) and 'peak_mib' in rss.get('ours', {}):
        peaks = rss['ours']['peak_mib'] / rss['official']['peak_mib']
        ratio_rss = f", peak RSS ours/official {peaks:.2f}"
    print(f"    time official/ours {med['official'] / med['ours']:.2f}x (above 1: ours faster); "
          f"saved for backward ours/official "
          f"{result['saved']['ours'] / result['saved']['official']:.2f}{ratio_rss}")


# --- the command ----------------------------------------------------------------------------

def forward_cases(official) -> list[tuple]:
    "(name, official args, our preset or None, overrides) of the forward comparisons."
    cases = [('mnist', official_args(official, README_COMMANDS['mnist']), None, None),
             ('cifar10', official_args(official, README_COMMANDS['cifar10']), None, None)]
    five_bit = README_COMMANDS['celeba_256'].replace('--dataset celeba_256',
                                                     f'--dataset celeba_{FIVE_BIT_SIZE}')
    args = official_args(official, f'{five_bit} {FIVE_BIT_CHANGES}')
    overrides = {'model.image_shape': f'3,{FIVE_BIT_SIZE},{FIVE_BIT_SIZE}',
                 'model.encoder_channels': 8, 'model.decoder_channels': 8,
                 'model.latent_channels': 4}
    cases.append(('CelebA-HQ-256 at 8 channels, 64x64, 5 bits', args, 'nvae_celebahq256',
                  overrides))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--official', required=True, help='a checkout of NVlabs/NVAE')
    parser.add_argument('--parts', nargs='*', default=['counts', 'forward', 'scorer', 'timing'],
                        choices=['counts', 'forward', 'scorer', 'timing', 'fixture'])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--no-rss', action='store_true', help='skip the fresh-process RSS runs')
    parser.add_argument('--only', choices=('official', 'ours'), help=argparse.SUPPRESS)
    parser.add_argument('--preset', help=argparse.SUPPRESS)
    parser.add_argument('--batch-size', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only: return only(args)
    official = import_official(args.official)
    commit = official_commit(official.root)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU "
          f"{device_name(torch.device('cpu'))}; PyTorch {torch.__version__}; {args.threads} "
          f"thread(s); NVlabs/NVAE at {official.root} ({commit or 'not a git checkout'})")
    found = None
    if 'counts' in args.parts or 'fixture' in args.parts:
        print("\nParameters of the official model of every README command, and of our preset")
        found = configurations(official)
        print_counts(found)
    if 'fixture' in args.parts:
        write_fixture(official, found)
    if 'forward' in args.parts:
        print("\nThe same weights (official, random; converted by the command line), images and "
              "noise: nats per image, evaluation mode")
        for name, official_args_, preset, overrides in forward_cases(official):
            print_forward(compare_forward(official, name, official_args_, preset, overrides))
    if 'scorer' in args.parts:
        print("\nThe official 8-bit mixture scorer and ours on the same parameters")
        compare_scorer(official)
    if 'timing' in args.parts:
        print(f"\nA training step, float32, {args.rounds} interleaved rounds after a warm-up step "
              f"each (median)")
        for name, batch in TIMED:
            result = time_steps(official, name, batch, args.rounds)
            rss = {} if args.no_rss else {side: fresh_process_rss(args, side, name, batch)
                                         for side in ('official', 'ours')}
            print_timing(result, rss)


if __name__ == '__main__':
    main()
