"""tools/gpu_check.py, the script to run when a GPU is lent, kept working: its CPU version with tiny presets."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_on_a_cpu_with_tiny_presets(tmp_path):
    done = subprocess.run([sys.executable, 'tools/gpu_check.py', '--smoke', '--out', str(tmp_path / 'out.jsonl')],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg'))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = [json.loads(line) for line in (tmp_path / 'out.jsonl').read_text().splitlines()]
    assert [r['preset'] for r in results if 'status' in r] == ['vae_digits', 'vdvae_digits']
    assert all(r['status'] == 'ok' and r['peak_dtype'] == 'bfloat16' for r in results if 'status' in r)
    assert [r['check'] for r in results if 'check' in r] == ['two processes equal one'] + ['cpu and cpu agree'] * 2
    no_gpu = subprocess.run([sys.executable, 'tools/gpu_check.py'], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=''), timeout=120)
    assert no_gpu.returncode == 2 and 'no GPU here' in no_gpu.stderr
