"""Peak memory does not grow with the dataset: `vdvae_imagenet64` (narrowed to fit a CPU) trains on sparse files that
stand in for ImageNet-64's 1,281,149 training images and for 10,000 at no disk cost, in one process and in two CPU
ranks, and a run is evaluated on a 50,000-image test split and a 16-image one. Each peak is the process's own
(Linux's VmHWM), read as it exits."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def environment(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    env.update(extra)
    return env


def sparse_images(path: Path, count: int, side: int = 64):
    "An .npy of `count` uint8 images (side, side, 3) that takes no disk space: a header, then a hole."
    import io
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr='|u1', fortran_order=False, shape=(count, side, side, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as f:
        f.write(header.getvalue())
        f.truncate(len(header.getvalue()) + count * side * side * 3)


PEAK = """
import runpy, sys
from pathlib import Path
sys.argv = {argv!r}
try: runpy.run_module({module!r}, run_name='__main__')
finally:
    status = Path('/proc/self/status').read_text().splitlines()
    peak = next(int(l.split()[1]) for l in status if l.startswith('VmHWM'))
    print(f"PEAK_KIB {{peak}}", flush=True)
"""


def peaks(output: str) -> list[int]:
    return [int(line.split()[1]) for line in output.splitlines() if line.startswith('PEAK_KIB')]


IMAGENET64_SMALL = ['--preset', 'vdvae_imagenet64', '--no-progress', '--max-steps', '2', '--override', 'batch_size=4',
                    'model.width=8', 'model.latent_channels=2', 'model.custom_widths=', 'final_eval_samples=1',
                    'eval_every=1000', 'save_every=1000', 'num_workers=1']


@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='peak memory is read from Linux /proc')
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """vdvae_imagenet64 (narrowed to fit a CPU) on 1,281,149 training images and on 10,000: the same peak memory within
    25%, in one process and in each of two CPU ranks; and an evaluation of a run on a 50,000-image test split against
    a 16-image one."""
    measured = {}
    for count in (10_000, 1_281_149):
        data_dir = tmp_path / f'data{count}'
        sparse_images(data_dir / 'imagenet64' / 'imagenet64-train.npy', count)
        sparse_images(data_dir / 'imagenet64' / 'imagenet64-valid.npy', 16)
        script = tmp_path / f'peak{count}.py'
        argv = ['hvae_nb.train', *IMAGENET64_SMALL, '--data-dir', str(data_dir), '--out', str(tmp_path / f'one{count}')]
        script.write_text(PEAK.format(argv=argv, module='hvae_nb.train'))
        one = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment(),
                             cwd=ROOT, timeout=600)
        assert one.returncode == 0, one.stderr[-3000:]
        argv[-1] = str(tmp_path / f'two{count}')
        script.write_text(PEAK.format(argv=argv, module='hvae_nb.train'))
        launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                  '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port',
                  '29523', str(script)]
        two = subprocess.run(launch, capture_output=True, text=True, env=environment(ACCELERATE_USE_CPU='1'),
                             cwd=ROOT, timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
        measured[count] = dict(one=peaks(one.stdout), two=peaks(two.stdout))
        assert len(measured[count]['one']) == 1 and len(measured[count]['two']) == 2, measured
    small, large = measured[10_000], measured[1_281_149]
    print('peak KiB', measured)
    assert max(large['one']) <= 1.25 * max(small['one']), measured
    assert max(large['two']) <= 1.25 * max(small['two']), measured
    # evaluation streams: a 50,000-image test split costs what a 16-image one does
    evaluations = {}
    for count in (16, 50_000):
        data_dir = tmp_path / 'data1281149'
        sparse_images(data_dir / 'imagenet64' / 'imagenet64-valid.npy', count)
        script = tmp_path / f'evaluate{count}.py'
        argv = ['hvae_nb.evaluate', str(tmp_path / 'one1281149'), '--data-dir', str(data_dir), '--k', '1',
                '--max-examples', '4', '--no-figures', '--no-progress']
        script.write_text(PEAK.format(argv=argv, module='hvae_nb.evaluate'))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment(),
                                cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f'IW k=1 on 4 of {count} images' in result.stdout, result.stdout
        evaluations[count] = peaks(result.stdout)[0]
    print('evaluation peak KiB', evaluations)
    assert evaluations[50_000] <= 1.25 * evaluations[16], evaluations


