"""Our VDVAE training step side by side with the official openai/vdvae code, on this machine.

For CIFAR-10's VDVAE (`vdvae_cifar10`: 39.1M parameters, 43 latent groups) it measures, in one
process:

1. **the same loss**: the official model, its zero-initialised layers (biases, the priors' last
   convolutions, the learned states) given random values, is copied into ours through the
   converter's name mapping (`hvae_nb.convert.vdvae_state_dict`); both score the same images,
   the official model in its own input format (channels last, the encoder reading
   (v - 120.63838) / 64.16736 and the loss v / 127.5 - 1, as its data.py), ours on v / 255. The
   negative ELBO, distortion and rate (nats per dimension) are printed twice: with z drawn after
   the same seed (both draw one standard normal per group, in the same order) and with z the
   posterior mean.
2. **the speed of a training step**, each as its code base takes it: forward, backward, the
   gradient norm clipped (200), the skip test, AdamW (betas 0.9/0.9, weight decay 0.01, lr 2e-4)
   and the EMA of the weights (0.9999). The official step is train.py's `training_step` without
   its MPI reduction, with its `update_ema` (train_helpers.py); ours is the benchmark's step
   (`hvae_nb.bench.make_training_step`, the trainer's `train_step`) followed by the trainer's
   EMA (`make_ema` ... `update_parameters`). The skip threshold is turned off on both sides so
   that every timed step takes the update. A warm-up step each, then `--rounds` rounds of one
   step of each variant, interleaved (a slow moment of a shared machine hits all): the median
   seconds per step, images/s and the ratio official/ours.
3. **memory**: the bytes of the tensors one forward pass keeps for the backward pass (each
   storage once, `torch.autograd.graph.saved_tensors_hooks`), and the peak RSS of a fresh
   process that builds one side only and takes a warm-up and one timed step (`--only`, run here
   as a subprocess; on Linux its VmHWM, see `hvae_nb.bench.max_rss_bytes`), with the RSS it had
   before building the model.

With `--mixed-precision bf16` ours runs under bfloat16 autocast, as `train --mixed-precision
bf16` and the benchmark apply it (the Accelerator's autocast; one setting per process, as the
Accelerator's state allows); the official code has no mixed precision and stays in float32, so
that ratio compares different arithmetic and is printed as such. The official float32 step,
timed in both runs, is the yardstick between them. `--channels-last` prepares ours in the NHWC
layout, as the benchmark's switch (the official model stays as it is written).

Run it against a checkout of https://github.com/openai/vdvae (nothing of it is in this
repository; its modules are imported from the path given). Its train_helpers.py imports mpi4py,
apex and, through data.py, torchvision at the top: where they are not installed, small stand-ins
beside the checkout (one MPI rank; `apex.optimizers.FusedAdam` as `torch.optim.AdamW`) let it
import; without train_helpers the EMA falls back to the same update written here. One thread:

    OMP_NUM_THREADS=1 python tools/compare_vdvae_official.py --official /path/to/vdvae \\
        [--batch-size 4] [--rounds 3] [--threads 1] [--mixed-precision bf16] [--channels-last]

A step of the full model at batch 4 takes 7-8 s on one thread of an AMD EPYC with AVX-512 (15-25 s
on an older AVX2 CPU): five rounds in float32 took three minutes there, the peak-RSS subprocesses
one more.

`--five-bit` checks only the 5-bit likelihood of FFHQ-256, in a second or two: the official
`vae_helpers.discretized_mix_logistic_loss(..., low_bit=True)` on data.py's 5-bit target
(8 floor(v / 8), scaled v / 127.5 - 1) against `VDVAEMixture(bits=5).log_prob` on the same random
outputs and images; then, from the official function alone, the probabilities of one pixel
summed over the 32 levels of its red channel (green and blue a spike on one level each), for a
few red components: the official 5-bit likelihood is not normalised.

    python tools/compare_vdvae_official.py --official /path/to/vdvae --five-bit
"""
import argparse, json, math, statistics, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hvae_nb.bench import (device_name, make_training_step, max_rss_bytes, prepare_model,  # noqa: E402
                           proc_status_bytes, synthetic_images)
from hvae_nb.convert import vdvae_state_dict  # noqa: E402
from hvae_nb.distributions import DiagonalGaussian  # noqa: E402
from hvae_nb.presets import get_preset  # noqa: E402
from hvae_nb.train import make_ema  # noqa: E402
from hvae_nb.vdvae import VDVAEMixture  # noqa: E402

PRESET = 'vdvae_cifar10'


def import_official(path: str):
    "The official `vae` module, its hyper-parameters for CIFAR-10 and its `update_ema` (or None)."
    sys.path.insert(0, str(Path(path).resolve()))
    import hps, vae
    hparams = hps.Hyperparams()
    parser = hps.add_vae_arguments(argparse.ArgumentParser())
    hps.parse_args_and_update_hparams(hparams, parser, s=['--hps', 'cifar10'])
    hparams.image_size, hparams.image_channels = 32, 3   # what data.py sets for cifar10
    try:
        from train_helpers import update_ema
    except ImportError as e:
        print(f"note: train_helpers.py does not import ({e}); the EMA update is written here")
        update_ema = None
    return vae, hparams, update_ema


def ema_update(model, ema_model, rate):
    "The EMA of the weights, p_ema <- rate p_ema + (1 - rate) p, for a missing train_helpers."
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema_model.parameters()):
            e.mul_(rate).add_(p * (1 - rate))


def official_inputs(images: torch.Tensor, preset):
    "Our images (B, 3, H, W) on [0, 1] as the official data.py gives them: input and target, NHWC."
    v = torch.round(images * 255).permute(0, 2, 3, 1).contiguous()
    shift, scale = -preset.model.input_mean, 1 / preset.model.input_std
    return (v + shift) * scale, (v - 127.5) * (1 / 127.5)


def randomise_constants(model, seed: int = 1):
    """Give every tensor that starts constant (zero biases, zero last layers, learned states,
    gains of one) random values, so that the loss check sees every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.02
            if (p == 0).all(): p.copy_(noise)
            elif (p == 1).all(): p.add_(5 * noise)


def our_stats(out, dims: int) -> dict:
    distortion, rate = out.reconstruction.mean() / dims, out.kl.sum(1).mean() / dims
    return dict(elbo=out.loss.item(), distortion=distortion.item(), rate=rate.item())


def same_loss(vae_module, hparams, preset, images, seed: int = 0):
    "The official and our losses on the same weights and images: z sampled, and z the mean."
    torch.manual_seed(seed)
    official = vae_module.VAE(hparams).train()
    randomise_constants(official)
    ours = preset.model.build().train()
    ours.load_state_dict(vdvae_state_dict(official.state_dict(), ours, 'the official model'))
    x_in, x_target = official_inputs(images, preset)
    dims = ours.dims
    results = {}
    drawn = vae_module.draw_gaussian_diag_samples
    for mode in ('sampled z, same seed', 'z = posterior mean'):
        mean = mode.startswith('z =')
        with torch.no_grad():
            if mean: vae_module.draw_gaussian_diag_samples = lambda mu, logsigma: mu
            torch.manual_seed(seed)
            theirs = {k: v.item() for k, v in official.forward(x_in, x_target).items()}
            vae_module.draw_gaussian_diag_samples = drawn
            torch.manual_seed(seed)
            sample = DiagonalGaussian.rsample
            if mean: DiagonalGaussian.rsample = lambda self, temperature=1.0: self.mean
            try: mine = our_stats(ours(images), dims)
            finally: DiagonalGaussian.rsample = sample
        results[mode] = (theirs, mine)
    return results


def saved_for_backward(loss_fn) -> int:
    "Bytes of the tensors one forward pass keeps for the backward pass (each storage once)."
    storages = {}
    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t): loss_fn()
    return sum(storages.values())


def official_variant(vae_module, hparams, update_ema, images, preset, seed: int = 0):
    """The official model with its optimiser and EMA copy; a call taking train.py's training
    step (without the MPI reduction); the forward pass's loss, for the memory count."""
    torch.manual_seed(seed)
    model = vae_module.VAE(hparams).train()
    ema_model = vae_module.VAE(hparams)
    ema_model.load_state_dict(model.state_dict())
    ema_model.requires_grad_(False)
    # train_helpers.load_opt: apex's FusedAdam there, PyTorch's AdamW (the same update) here
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=hparams.wd, lr=hparams.lr,
                                  betas=(hparams.adam_beta1, hparams.adam_beta2))
    rate = torch.as_tensor(hparams.ema_rate)   # as train.py's train_loop passes it
    x_in, x_target = official_inputs(images, preset)
    ema = update_ema or ema_update
    records = []

    def step():
        model.zero_grad()
        stats = model.forward(x_in, x_target)
        stats['elbo'].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hparams.grad_clip).item()
        nans = bool(torch.isnan(stats['distortion']) | torch.isnan(stats['rate']))
        taken = not nans and (hparams.skip_threshold == -1 or grad_norm < hparams.skip_threshold)
        if taken:
            optimizer.step()
            ema(model, ema_model, rate)
        records.append(dict(loss=stats['elbo'].item(), grad_norm=grad_norm, taken=taken))

    return step, lambda: model.forward(x_in, x_target)['elbo'], records


def our_variant(preset, images, mixed_precision: str, seed: int = 0,
                channels_last: bool = False):
    """Our model prepared as the benchmark does, its step (`make_training_step`) and the trainer's
    EMA; the forward pass's loss (under autocast when it trains so), for the memory count."""
    torch.manual_seed(seed)
    model, x = prepare_model(preset, images, torch.device('cpu'), channels_last)
    ema = make_ema(model, preset.train.ema_decay)
    train_step = make_training_step(model, preset, x, mixed_precision=mixed_precision)
    records = []

    def step():
        record = train_step()
        if not record['skipped_update']: ema.update_parameters(model)
        records.append(dict(loss=record['loss'], grad_norm=record['grad_norm'],
                            taken=not record['skipped_update']))

    bf16 = mixed_precision == 'bf16'
    def loss():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16): return model(x).loss
    return step, loss, records


def cpu_description() -> dict:
    text = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').exists() else ''
    lines = text.splitlines()
    flags = next((l.split(':', 1)[1].split() for l in lines if l.startswith('flags')), [])
    wanted = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile')
    return dict(name=device_name(torch.device('cpu')), flags=[f for f in wanted if f in flags],
                capability=torch.backends.cpu.get_cpu_capability(),
                mkldnn_bf16=torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                torch=torch.__version__, threads=torch.get_num_threads())


def only(args, preset, vae_module, hparams, update_ema):
    "One side in this fresh process: a warm-up and `rounds` steps; prints its peak RSS as JSON."
    images = synthetic_images(preset, args.batch_size, 'cpu')
    before = proc_status_bytes('VmRSS')     # None off Linux
    if args.only == 'official':
        step, _, records = official_variant(vae_module, hparams, update_ema, images, preset)
    else:
        step, _, records = our_variant(preset, images, args.mixed_precision,
                                       channels_last=args.channels_last)
    seconds = []
    for _ in range(1 + args.rounds):
        began = time.perf_counter(); step(); seconds.append(time.perf_counter() - began)
    print(json.dumps(dict(only=args.only, mixed_precision=args.mixed_precision,
                          rss_before_model_mib=before and before / 2**20, peak_rss_mib=max_rss_bytes() / 2**20,
                          step_s=seconds, steps=records)))


def fresh_process_rss(args, which: str) -> dict:
    command = [sys.executable, __file__, '--official', args.official, '--only', which,
               '--batch-size', str(args.batch_size), '--rounds', '1',
               '--threads', str(args.threads), '--mixed-precision', args.mixed_precision,
               *(['--channels-last'] if args.channels_last else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
        return dict(only=which, error=f'exit status {done.returncode}: {tail}')
    return json.loads(lines[-1])


FIVE_BIT_COMPONENTS = {   # red components, centre and scale in 8-bit units
    'interior, 1 level wide': (96, 8), 'interior, 2.5 levels wide': (130, 20),
    'narrow, in an overlap': (116.0, 0.12), 'near white': (245, 6),
    'narrow, at white': (255, 0.5), 'wide, at white': (255, 40)}


def five_bit_likelihood(path: str, seed: int = 0):
    "The official 5-bit loss against ours, and the official probabilities summed over the levels."
    sys.path.insert(0, str(Path(path).resolve()))
    from vae_helpers import discretized_mix_logistic_loss      # imports numpy and torch only
    generator = torch.Generator().manual_seed(seed)
    out = 2 * torch.randn(4, 100, 8, 8, generator=generator)  # 10 components, RGB
    pixels = torch.randint(0, 256, (4, 3, 8, 8), generator=generator).float()
    target = (torch.floor(pixels / 8) * 8 - 127.5) / 127.5     # data.py's 5-bit target
    dims = 3 * 8 * 8
    with torch.no_grad():
        theirs = discretized_mix_logistic_loss(target.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1),
                                               low_bit=True) * dims
        ours = -VDVAEMixture(10, bits=5).log_prob(out, pixels / 255)
    print(f"5-bit negative log-likelihood per image (nats), official {theirs.tolist()}")
    print(f"{'':48s} ours {ours.tolist()}; largest difference "
          f"{(ours - theirs).abs().max().item():.1e}")
    levels = 8 * torch.arange(32.0)                             # the 8-bit values of the target
    spike = dict(mean=128 / 127.5 - 1, log_scale=-7.0)          # green and blue: all on 128
    print("The official probabilities of one pixel, summed over the 32 levels of red "
          "(green and blue a spike on 128):")
    for name, (centre, scale) in FIVE_BIT_COMPONENTS.items():
        l = torch.tensor([0.0, centre / 127.5 - 1, math.log(scale / 127.5), 0.0,
                          spike['mean'], spike['log_scale'], 0.0,
                          spike['mean'], spike['log_scale'], 0.0])
        x = torch.stack([levels, torch.full_like(levels, 128), torch.full_like(levels, 128)], 1)
        with torch.no_grad():
            log_p = -3 * discretized_mix_logistic_loss((x / 127.5 - 1).view(32, 1, 1, 3),
                                                       l.expand(32, 10).reshape(32, 1, 1, 10),
                                                       low_bit=True)
            mine = VDVAEMixture(1, bits=5).log_prob(l.expand(32, 10).reshape(32, 10, 1, 1),
                                                    (x / 255).view(32, 3, 1, 1))
        print(f"  {name:26s} centre {centre:5.1f}, scale {scale:5.2f}: official "
              f"{log_p.double().exp().sum().item():.4f}, ours {mine.double().exp().sum().item():.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--official', required=True, help='a checkout of openai/vdvae')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--mixed-precision', choices=('no', 'bf16'), default='no')
    parser.add_argument('--channels-last', action='store_true',
                        help='ours with weights and images in the NHWC layout (the benchmark\'s)')
    parser.add_argument('--only', choices=('official', 'ours'),
                        help='build and time one side only (for its peak RSS)')
    parser.add_argument('--no-rss', action='store_true', help='skip the fresh-process RSS runs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--five-bit', action='store_true',
                        help="only the 5-bit likelihood (FFHQ-256's) against the official loss")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.five_bit: return five_bit_likelihood(args.official, args.seed)
    vae_module, hparams, update_ema = import_official(args.official)
    hparams.skip_threshold = -1        # every timed step takes the update
    preset = get_preset(PRESET)
    preset = replace(preset, train=replace(preset.train, skip_threshold=0))
    if args.only: return only(args, preset, vae_module, hparams, update_ema)

    cpu = cpu_description()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU {cpu['name']} "
          f"({', '.join(cpu['flags'])}; PyTorch {cpu['torch']} dispatch {cpu['capability']}, "
          f"oneDNN bf16 {cpu['mkldnn_bf16']}); {cpu['threads']} thread(s); batch "
          f"{args.batch_size}; EMA from {'train_helpers' if update_ema else 'this script'}")
    images = synthetic_images(preset, args.batch_size, 'cpu', args.seed)

    print("\n1. Same loss, official weights copied into ours (nats per dimension, float32)")
    for mode, (theirs, mine) in same_loss(vae_module, hparams, preset, images, args.seed).items():
        for key in ('elbo', 'distortion', 'rate'):
            print(f"  {mode:22s} {key:10s} official {theirs[key]:.7f}  ours {mine[key]:.7f}  "
                  f"difference {mine[key] - theirs[key]:+.1e}")

    # one mixed precision per process: the Accelerator's state cannot change once made
    ours_name = 'ours, bf16 autocast' if args.mixed_precision == 'bf16' else 'ours, float32'
    ours_name += ', NHWC' if args.channels_last else ''
    variants = [('official, float32',
                 *official_variant(vae_module, hparams, update_ema, images, preset, args.seed)),
                (ours_name, *our_variant(preset, images, args.mixed_precision, args.seed,
                                         args.channels_last))]
    names, steps, losses, records = zip(*variants)
    saved = [saved_for_backward(loss) for loss in losses]
    for step in steps: step()                                  # warm-up, untimed
    seconds = [[] for _ in steps]
    for _ in range(args.rounds):
        for i, step in enumerate(steps):
            began = time.perf_counter(); step(); seconds[i].append(time.perf_counter() - began)

    print(f"\n2. Training step, {args.rounds} interleaved rounds after a warm-up step each")
    base = statistics.median(seconds[0])
    print(f"  {'':26s} {'s/step':>7s} {'img/s':>6s} {'official/this':>13s} "
          f"{'saved for backward':>18s}  every step (s)")
    for name, s, b in zip(names, seconds, saved):
        t = statistics.median(s)
        print(f"  {name:26s} {t:7.2f} {args.batch_size / t:6.3f} {base / t:12.2f}x "
              f"{b / 2**20:14,.0f} MiB  {', '.join(f'{v:.1f}' for v in s)}")
    for name, r in zip(names, records):
        norms = ', '.join(f"{x['grad_norm']:.3g}" for x in r)
        print(f"  {name:26s} loss {r[0]['loss']:.4f} -> {r[-1]['loss']:.4f}; gradient norms "
              f"{norms}; updates taken {sum(x['taken'] for x in r)}/{len(r)}")
    if args.mixed_precision == 'bf16':
        print("  (the official code has no mixed precision: its float32 step against ours in "
              "bfloat16 compares different arithmetic)")

    if args.no_rss: return
    print("\n3. Peak RSS of a fresh process holding one side (a warm-up and one timed step)")
    for which in ('official', 'ours'):
        r = fresh_process_rss(args, which)
        if 'error' in r: print(f"  {which}: {r['error']}"); continue
        label = ours_name if which == 'ours' else 'official, float32'
        print(f"  {label:26s} peak {r['peak_rss_mib']:,.0f} MiB (before the model "
              f"{r['rss_before_model_mib']:,.0f} MiB; steps "
              f"{', '.join(f'{v:.1f}' for v in r['step_s'])} s)")


if __name__ == '__main__':
    main()
