"""The data path at the papers' scale, as a user meets it: `python -m hvae_nb.data pack` on folders of images the tests
draw (every mode Pillow reads, a corrupt file, an empty folder), `python -m hvae_nb.train --dataset` on what it packed,
bad input as one line and exit status 2 with nothing written, loader workers that change nothing, and peak memory that
does not grow with the dataset (sparse files stand in for ImageNet-64's 1,281,149 images at no disk cost)."""
import hashlib, json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hvae_nb import data as data_module, train as train_module  # noqa: E402
from hvae_nb.data import ArrayFile, load_data  # noqa: E402


def environment(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    env.update(extra)
    return env


def module(name: str, *args, timeout: int = 300, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', name, *map(str, args)], capture_output=True, text=True,
                          env=environment(**extra), cwd=ROOT, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *expected: str):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(e in lines[0] for e in expected), result.stderr


def draw_folder(folder: Path, count: int = 12, size=(20, 14), grey=False) -> Path:
    "Images of several modes, sizes and formats, some nested, and a file that is no image."
    rng = np.random.default_rng(0)
    (folder / 'nested' / 'deeper').mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1] + i % 3, size[0] + i % 5, 3), np.uint8)
        image = Image.fromarray(pixels)
        kind = i % 6
        where = folder if i % 2 else folder / 'nested' / ('deeper' if i % 4 == 1 else '')
        if kind == 0: image.save(where / f'{i:03d}.png')
        elif kind == 1: image.convert('L').save(where / f'{i:03d}.png')
        elif kind == 2: image.convert('RGBA').save(where / f'{i:03d}.PNG')
        elif kind == 3: image.convert('P').save(where / f'{i:03d}.png')
        elif kind == 4: image.save(where / f'{i:03d}.jpg', quality=90)
        else: image.save(where / f'{i:03d}.webp')
    (folder / 'README.txt').write_text('not an image')
    return folder


def packed_arrays(folder: Path) -> dict:
    return {p.stem: np.load(p) for p in folder.glob('*.npy')}


def test_pack_a_folder_of_every_mode_and_train_on_it(tmp_path):
    source = draw_folder(tmp_path / 'source')
    data_dir = tmp_path / 'data'
    result = module('hvae_nb.data', 'pack', source, '--name', 'drawn', '--size', 8, '--grey', '--data-dir', data_dir,
                    '--test-fraction', '0.25', '--no-progress')
    assert result.returncode == 0, result.stderr
    assert 'drawn: train 9, test 3 images of 8x8, 1 channel(s)' in result.stdout
    folder = data_dir / 'drawn'
    info = json.loads((folder / 'dataset.json').read_text())
    assert (info['size'], info['channels'], info['source']) == (8, 1, str(source.resolve()))
    assert {s: r['count'] for s, r in info['splits'].items()} == {'train': 9, 'test': 3}
    for record in info['splits'].values():       # the checksum is the file's, by hashlib
        assert record['sha256'] == hashlib.sha256((folder / record['file']).read_bytes()).hexdigest()
    arrays = packed_arrays(folder)
    assert arrays['train'].dtype == np.uint8 and arrays['train'].shape == (9, 8, 8, 1)
    # every image file, in path order, is in exactly one split; the README is not
    files = sorted(p for p in source.rglob('*') if p.suffix.lower() in ('.png', '.jpg', '.webp'))
    assert len(files) == 12 and sum(len(a) for a in arrays.values()) == 12
    # train on it: a preset whose model fits 8x8 grey images, scored by the 8-bit likelihood
    trained = module('hvae_nb.train', '--preset', 'vdvae_digits', '--dataset', 'drawn', '--data-dir', data_dir,
                     '--override', 'model.likelihood=logistic_mixture', 'batch_size=4', 'max_steps=3',
                     'final_eval_samples=1', 'eval_every=100', '--out', tmp_path / 'run', '--no-progress')
    assert trained.returncode == 0, trained.stderr
    assert 'vdvae_digits: test NLL' in trained.stdout
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['preset']['dataset'] == 'drawn'


def test_a_misfit_says_both_shapes(tmp_path):
    data_dir = tmp_path / 'data'
    assert module('hvae_nb.data', 'pack', draw_folder(tmp_path / 'source'), '--name', 'rgb16', '--size', 16,
                  '--data-dir', data_dir, '--no-progress').returncode == 0
    misfit = module('hvae_nb.train', '--preset', 'vdvae_digits', '--dataset', 'rgb16', '--data-dir', data_dir,
                    '--out', tmp_path / 'run', '--no-progress')
    one_line_error(misfit, 'image_shape (1, 8, 8)', "'rgb16' images of shape (3, 16, 16)")
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('case, expected', [
    ('empty', 'is empty'), ('no images', 'holds no PNG, JPEG or WebP images'), ('size 0', 'positive integer'),
    ('size abc', "invalid int value: 'abc'"), ('corrupt', 'bad.png: not a readable image'),
    ('taken', 'already exists'), ('recipe', "--dataset 'cifar100' is not a recipe"), ('no command', 'pack or verify'),
    ('missing', 'does not exist'),
])
def test_pack_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, expected):
    "In this process (a Python start per case costs seconds); the real command line is run below."
    source, data_dir = tmp_path / 'source', tmp_path / 'data'
    draw_folder(source, count=4)
    args = ['pack', source, '--name', 'pets', '--size', 8, '--data-dir', data_dir, '--no-progress']
    if case == 'empty':
        source = tmp_path / 'empty'; source.mkdir(); args[1] = source
    elif case == 'no images':
        source = tmp_path / 'text'; source.mkdir(); (source / 'a.txt').write_text('x'); args[1] = source
    elif case == 'size 0': args[5] = 0
    elif case == 'size abc': args[5] = 'abc'
    elif case == 'corrupt':
        good = (source / 'nested' / '000.png').read_bytes()
        (source / 'nested' / 'bad.png').write_bytes(good[:len(good) // 2])
    elif case == 'taken': (data_dir / 'pets').mkdir(parents=True)
    elif case == 'recipe': args[2:4] = ['--dataset', 'cifar100']
    elif case == 'no command': args = args[1:]
    elif case == 'missing': args[1] = tmp_path / 'nowhere'
    before = sorted(data_dir.rglob('*')) if data_dir.exists() else []
    with pytest.raises(SystemExit) as stopped: data_module.main(list(map(str, args)))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and lines[0].startswith('hvae_nb.data'), err
    assert 'error: ' in lines[0], err
    assert expected in lines[0], lines[0]
    after = sorted(data_dir.rglob('*')) if data_dir.exists() else []
    assert after == before, after          # nothing half-written, not even a hidden folder


def test_the_real_command_line_prints_no_traceback(tmp_path):
    one_line_error(module('hvae_nb.data', 'pack', tmp_path / 'nowhere', '--name', 'x', '--size', 8), 'does not exist')
    one_line_error(module('hvae_nb.data'), 'expected a command, pack or verify')


def test_skip_bad_packs_the_rest_and_says_how_many(tmp_path):
    source = draw_folder(tmp_path / 'source', count=6)
    good = (source / 'nested' / '000.png').read_bytes()
    (source / 'cut.png').write_bytes(good[:40])
    (source / 'nested' / 'garbage.jpg').write_bytes(b'not a jpeg at all')
    result = module('hvae_nb.data', 'pack', source, '--name', 'pets', '--size', 8, '--data-dir', tmp_path / 'data',
                    '--skip-bad', '--no-progress')
    assert result.returncode == 0, result.stderr
    assert '2 unreadable image(s) skipped' in result.stdout
    info = json.loads((tmp_path / 'data' / 'pets' / 'dataset.json').read_text())
    assert sorted(info['skipped']) == ['cut.png', 'nested/garbage.jpg']
    assert sum(r['count'] for r in info['splits'].values()) == 6
    assert sum(len(a) for a in packed_arrays(tmp_path / 'data' / 'pets').values()) == 6


def test_an_interrupted_pack_leaves_nothing_that_looks_finished(tmp_path):
    source = draw_folder(tmp_path / 'source', count=6)
    script = textwrap.dedent(f"""
        import os, signal
        import hvae_nb.data as data
        calls = []
        original = data.decode_image
        def decode_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4: os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        data.decode_image = decode_then_die
        data.main(['pack', {str(source)!r}, '--name', 'pets', '--size', '8', '--data-dir', {str(tmp_path / 'data')!r},
                   '--workers', '1', '--no-progress'])
    """)
    died = subprocess.run([sys.executable, '-c', script], env=environment(), cwd=ROOT, timeout=120)
    assert died.returncode == -9
    assert not (tmp_path / 'data' / 'pets').exists()           # only a hidden, unfinished folder
    with pytest.raises(Exception, match="not packed in"):
        load_data('pets', data_dir=tmp_path / 'data')
    again = module('hvae_nb.data', 'pack', source, '--name', 'pets', '--size', 8, '--data-dir', tmp_path / 'data',
                   '--no-progress')
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / 'data').iterdir()) == ['pets']   # the abandoned folder is gone


def train_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stopped: train_module.main(list(map(str, argv)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and lines[0].startswith('hvae_nb.train: error: '), lines
    return lines[0]


def test_bad_data_stops_training_in_one_line(tmp_path, capsys):
    data_dir = tmp_path / 'data'
    data_module.pack_images(draw_folder(tmp_path / 'source'), name='drawn', size=8, grey=True, data_dir=data_dir,
                            progress=False)
    train = ['--preset', 'vdvae_digits', '--data-dir', data_dir, '--override', 'model.likelihood=logistic_mixture',
             '--out', tmp_path / 'run', '--no-progress']
    with open(data_dir / 'drawn' / 'train.npy', 'r+b') as f:      # one byte changes after packing
        f.seek(-3, os.SEEK_END); flipped = bytes([f.read(1)[0] ^ 1]); f.seek(-3, os.SEEK_END); f.write(flipped)
    assert 'train.npy: checksum does not match' in train_error(capsys, train + ['--dataset', 'drawn'])
    with pytest.raises(SystemExit) as stopped: data_module.main(['verify', 'drawn', '--data-dir', str(data_dir)])
    assert stopped.value.code == 2 and 'checksum does not match' in capsys.readouterr().err
    line = train_error(capsys, train + ['--dataset', 'nothing'])
    assert "unknown dataset 'nothing'" in line and 'packed there: drawn' in line
    ffhq = ['--preset', 'vdvae_ffhq256', '--data-dir', data_dir, '--out', tmp_path / 'run', '--no-progress']
    (data_dir / 'ffhq256').mkdir()
    np.save(data_dir / 'ffhq256' / 'ffhq-256.npy', np.zeros((8, 4, 4, 3), np.float32))
    line = train_error(capsys, ffhq)
    assert 'ffhq-256.npy: float32 array' in line and 'expected uint8' in line
    np.save(data_dir / 'ffhq256' / 'ffhq-256.npy', np.zeros((8, 4, 4), np.uint8))
    line = train_error(capsys, ffhq)
    assert 'shape (8, 4, 4)' in line and 'expected uint8 images (N, H, W, 3)' in line
    np.save(data_dir / 'ffhq256' / 'ffhq-256.npy', np.zeros((7010, 4, 4, 3), np.uint8))
    with open(data_dir / 'ffhq256' / 'ffhq-256.npy', 'r+b') as f: f.truncate(2000)
    assert 'truncated' in train_error(capsys, ffhq)
    assert not (tmp_path / 'run').exists()


def test_loader_workers_change_nothing(tmp_path):
    "The batch of step s is a function of (seed, s): two worker processes train the same weights as none."
    common = ['--preset', 'lvae_digits', '--max-steps', '12', '--no-progress', '--override', 'eval_every=1000',
              'final_eval_samples=2', 'horizontal_flip=0.5']
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f'workers{workers}'
        result = module('hvae_nb.train', *common, f'num_workers={workers}', '--out', out)
        assert result.returncode == 0, result.stderr
        runs[workers] = load_file(out / 'model.safetensors')
    assert runs[0].keys() == runs[2].keys() and all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_array_file_reads_the_rows_asked_for(tmp_path):
    "ArrayFile against numpy's own reading of the same file, for runs, repeats and slices."
    pixels = np.random.default_rng(0).integers(0, 256, (50, 3, 4, 2), np.uint8)
    np.save(tmp_path / 'a.npy', pixels)
    array = ArrayFile(tmp_path / 'a.npy')
    for rows in ([0], [3, 4, 5, 9, 9, 10, 49], list(range(50))):
        assert np.array_equal(array[np.array(rows)], pixels[rows])
    assert np.array_equal(array[7:19], pixels[7:19]) and array.shape == pixels.shape
    with open(tmp_path / 'a.npy', 'r+b') as f: f.truncate(300)
    with pytest.raises(Exception, match='truncated'): ArrayFile(tmp_path / 'a.npy')


def _packed_pixels(folder: Path, split: str) -> np.ndarray:
    return np.load(folder / f'{split}.npy')


def test_the_imagenet_recipe_splits_by_the_release_folders(tmp_path):
    "van den Oord et al.'s down-sampled ImageNet: train_32x32/ trains, valid_32x32/ tests; each image lands whole."
    source, rng = tmp_path / 'release', np.random.default_rng(1)
    drawn = {}
    for folder, count in (('train_32x32', 5), ('valid_32x32', 3)):
        (source / folder).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
            Image.fromarray(pixels).save(source / folder / f'{i:05d}.png')
            drawn.setdefault(folder, []).append(pixels)
    result = module('hvae_nb.data', 'pack', source, '--dataset', 'imagenet32', '--data-dir', tmp_path / 'data',
                    '--no-progress')
    assert result.returncode == 0, result.stderr
    packed = tmp_path / 'data' / 'imagenet32'
    for split, folder in (('train', 'train_32x32'), ('test', 'valid_32x32')):
        np.testing.assert_array_equal(_packed_pixels(packed, split), np.stack(drawn[folder]))   # 32 px: untouched


def test_a_test_list_names_the_test_images(tmp_path):
    source = draw_folder(tmp_path / 'source')
    listed = ['nested/000.png', '005.webp', '003.png']          # a path relative to the folder, and names
    (tmp_path / 'test.txt').write_text('\n'.join(listed) + '\n')
    result = module('hvae_nb.data', 'pack', source, '--name', 'listed', '--size', 8, '--data-dir', tmp_path / 'data',
                    '--test-list', tmp_path / 'test.txt', '--no-progress')
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / 'data' / 'listed' / 'dataset.json').read_text())
    assert {s: r['count'] for s, r in info['splits'].items()} == {'train': 9, 'test': 3}
    (tmp_path / 'wrong.txt').write_text('nowhere.png\n')
    one_line_error(module('hvae_nb.data', 'pack', source, '--name', 'wrong', '--size', 8, '--data-dir',
                          tmp_path / 'data', '--test-list', tmp_path / 'wrong.txt', '--no-progress'),
                   'not found', 'nowhere.png')


def test_the_ffhq_and_celebahq_splits_are_the_papers(tmp_path):
    "On file lists of the real sizes (no image is read): FFHQ-256 as openai/vdvae's data.py splits, FFHQ-1024 as its"
    " setup script, CelebA-HQ-256 holding out 3,000 of 30,000."
    files = [tmp_path / f'{i:05d}.png' for i in range(70_000)]
    ffhq256 = data_module.PACK_RECIPES['ffhq256']
    split = ffhq256.split(files, tmp_path, **ffhq256.settings)
    np.random.seed(5)                                    # openai/vdvae: np.random.seed(5); permutation; last 7,000 valid
    official = np.random.permutation(70_000)
    np.testing.assert_array_equal(split['test'], np.sort(official[-7000:]))
    np.testing.assert_array_equal(split['train'], np.sort(official[:-7000]))
    ffhq1024 = data_module.PACK_RECIPES['ffhq1024']
    split = ffhq1024.split(files, tmp_path, **ffhq1024.settings)
    assert (split['train'][[0, -1]].tolist(), split['test'][[0, -1]].tolist()) == ([0, 64_999], [65_000, 69_999])
    celebahq = data_module.PACK_RECIPES['celebahq256']
    split = celebahq.split(files[:30_000], tmp_path, **{'seed': 0, **celebahq.settings})
    assert (len(split['train']), len(split['test'])) == (27_000, 3_000)
    assert sorted(np.concatenate([split['train'], split['test']]).tolist()) == list(range(30_000))
