"""The checks to run when a GPU is lent, in under ten minutes; and, with --smoke, the same script on a CPU with tiny
presets, so that CI keeps it working.

    python tools/gpu_check.py                 # on a machine with a GPU
    python tools/gpu_check.py --smoke         # anywhere: tiny presets, a few steps, CPU

1. **The benchmark** (`python -m hvae_nb.bench`) of every paper preset at its per-GPU batch (the batch of one GPU in
   the paper's run: the preset's global batch over its GPU count) in bf16, each in its own process, with MFU against
   the measured bf16 matmul peak and the datasheet's.
2. **Two processes equal one**: a few steps of `lvae_digits` launched as two processes (`accelerate launch`, two GPUs
   when the machine has them, else two CPU ranks) against one process with two accumulation steps: the same losses
   to 1e-5.
3. **CPU and GPU agree**: one training loss of `vdvae_digits` and of `nvae_digits`, same weights and batch, float32
   on the GPU (TF32 off) against the CPU: to 1e-4 relative.

Each part prints its lines and a verdict; the script exits 1 when a check fails. The results also go to
`--out FILE` as JSON lines.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hvae_nb.presets import PRESETS, get_preset  # noqa: E402
from hvae_nb.runs import Run  # noqa: E402

# the batch of one GPU in each paper's run: the global batch over the number of GPUs (the presets' descriptions)
PER_GPU_BATCH = {'nvae_mnist': 200, 'nvae_cifar10': 32, 'nvae_celeba64': 16, 'nvae_imagenet32': 24,
                 'nvae_celebahq256': 4, 'nvae_ffhq256': 4, 'vdvae_cifar10': 16, 'vdvae_imagenet32': 8,
                 'vdvae_imagenet64': 4, 'vdvae_ffhq256': 1, 'vdvae_ffhq1024': 1}
SMOKE_PRESETS = {'vae_digits': 8, 'vdvae_digits': 8}


def environment(**extra):
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'),
                MPLBACKEND='Agg', **extra)


def benchmark(presets: dict, precision: str, device: str, budget: float) -> list[dict]:
    "Part 1: every preset at its per-GPU batch, one process each, through the benchmark's command line."
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, batch in presets.items():
            out = Path(scratch) / f'{name}.jsonl'
            done = subprocess.run([sys.executable, '-m', 'hvae_nb.bench', '--presets', name, '--batch-size',
                                   str(batch), '--mixed-precision', precision, '--device', device, '--steps', '2',
                                   '--repeats', '2', '--warmup', '1', '--budget', str(budget), '--out', str(out)],
                                  capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=900)
            lines = out.read_text().splitlines() if out.exists() else []
            result = json.loads(lines[-1]) if lines else dict(preset=name, status='error', error=done.stderr[-300:])
            results.append(result)
            if result.get('status') == 'ok':
                sheet = result.get('datasheet_mfu')
                print(f"{name:18s} batch {batch:4d}: {result['train_images_per_s']:9.2f} img/s, "
                      f"{result['peak_memory_bytes'] / 2**20:8,.0f} MiB, MFU {result['mfu']:.3f} "
                      f"(measured {result['peak_dtype']} peak)"
                      + (f", {sheet:.3f} (datasheet)" if sheet else ''), flush=True)
            else: print(f"{name:18s} batch {batch:4d}: {result.get('status')}: {result.get('error')}", flush=True)
    return results


def step_losses(run_dir: Path) -> dict:
    return {r['step']: r['loss'] for r in Run.open(run_dir).metrics() if 'loss' in r}


def two_processes_equal_one(use_gpus: bool) -> dict:
    "Part 2: two processes (two GPUs, else two CPU ranks) against one process with two accumulation steps."
    args = ['--preset', 'lvae_digits', '--max-steps', '6', '--batch-size', '64', '--no-progress', '--override',
            'log_every=1', 'eval_every=1000', 'final_eval_samples=2']
    with tempfile.TemporaryDirectory() as scratch:
        launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                  '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                  '--main_process_port', '29561', '-m', 'hvae_nb.train']
        extra = {} if use_gpus else dict(ACCELERATE_USE_CPU='1')
        two = subprocess.run(launch + args + ['--out', f'{scratch}/two'], capture_output=True, text=True, cwd=ROOT,
                             env=environment(**extra), timeout=600)
        one = subprocess.run([sys.executable, '-m', 'hvae_nb.train'] + args + ['--grad-accum', '2', '--out',
                             f'{scratch}/one'], capture_output=True, text=True, cwd=ROOT,
                             env=environment(**({} if use_gpus else dict(CUDA_VISIBLE_DEVICES=''))), timeout=600)
        if two.returncode or one.returncode:
            return dict(check='two processes equal one', ok=False, error=(two.stderr or one.stderr)[-500:])
        a, b = step_losses(Path(scratch) / 'two'), step_losses(Path(scratch) / 'one')
        gap = max(abs(a[s] - b[s]) for s in a)
    ok = sorted(a) == list(range(1, 7)) and gap < 1e-5
    print(f"two processes ({'GPUs' if use_gpus else 'CPU ranks'}) against one: largest loss difference "
          f"{gap:.2e} over 6 steps: {'ok' if ok else 'FAILED'}", flush=True)
    return dict(check='two processes equal one', ok=ok, largest_difference=gap, gpus=use_gpus)


def cpu_and_gpu_agree(device: str) -> list[dict]:
    "Part 3: one training loss on `device` (float32, TF32 off) and on the CPU, same weights and batch."
    results = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name in ('vdvae_digits', 'nvae_digits'):
            preset = get_preset(name)
            torch.manual_seed(0)
            model = preset.model.build().train()
            x = torch.bernoulli(torch.full((16, *preset.model.image_shape), 0.3))
            losses = {}
            for where in ('cpu', device):
                torch.manual_seed(1)
                losses[where] = model.to(where)(x.to(where)).loss.item()
            relative = abs(losses['cpu'] - losses[device]) / abs(losses['cpu'])
            ok = relative < 1e-4
            print(f"{name}: loss {losses['cpu']:.6f} on the CPU, {losses[device]:.6f} on {device}: relative "
                  f"difference {relative:.1e}: {'ok' if ok else 'FAILED'}", flush=True)
            results.append(dict(check=f'cpu and {device} agree', preset=name, ok=ok, relative=relative))
    finally: torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--smoke', action='store_true', help='tiny presets on the CPU (what CI runs)')
    parser.add_argument('--budget', type=float, default=8.0, help='seconds per benchmark measurement')
    parser.add_argument('--out', help='write the results as JSON lines to this file')
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("gpu_check: error: no GPU here; run with --smoke for the CPU version", file=sys.stderr)
        sys.exit(2)
    began = time.time()
    device = 'cuda' if gpu else 'cpu'
    presets = PER_GPU_BATCH if gpu else SMOKE_PRESETS
    assert set(presets) <= set(PRESETS), set(presets) - set(PRESETS)
    print(f"1. the benchmark in bf16 ({'paper presets at their per-GPU batch' if gpu else 'tiny presets, CPU'})")
    results = benchmark(presets, 'bf16', device, args.budget if gpu else 0.5)
    print("2. two processes equal one")
    results.append(two_processes_equal_one(gpu and torch.cuda.device_count() >= 2))
    print("3. CPU and GPU agree" if gpu else "3. CPU and CPU agree (smoke: the code path only)")
    results += cpu_and_gpu_agree(device)
    failed = [r for r in results if r.get('ok') is False or r.get('status') not in (None, 'ok')]
    print(f"{time.time() - began:.0f} s; {len(failed)} failed")
    if args.out: Path(args.out).write_text(''.join(json.dumps(r) + '\n' for r in results))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
