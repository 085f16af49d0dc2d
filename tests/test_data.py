"""Tests for hvae_nb.data: real MNIST files when present, and hand-written files in the official
formats for everything else. No test touches the network: downloads use file:// URLs."""
import gzip
import hashlib
import io
import os
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Test the working tree even when the package is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvae_nb.data import (DATASETS, DataError, ImageData, binarize, download_file, image_grid,  # noqa: E402
                          load_binarized_mnist, load_cifar10, load_data, load_digits_images, load_mnist,
                          read_idx, resolve_data_dir)

# The project's data setting: $HVAE_DATA (CI sets it), else the shared data folder beside the repository's checkout.
REAL_DATA = Path(os.environ.get("HVAE_DATA") or Path(__file__).resolve().parents[2]/"shared"/"data")
needs_mnist = pytest.mark.skipif(not (REAL_DATA/"mnist").is_dir(),
                                 reason=f"no MNIST files in {REAL_DATA}/mnist (set HVAE_DATA to a folder holding mnist/)")
needs_binarized = pytest.mark.skipif(not (REAL_DATA/"binarized_mnist"/"binarized_mnist_packed.npz").is_file(),
                                     reason=f"no binarized_mnist_packed.npz in {REAL_DATA}/binarized_mnist "
                                            "(set HVAE_DATA to a folder holding binarized_mnist/)")


# ---- writers for the official formats, independent of the code under test ----

def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    magic = {3: 2051, 1: 2049}[array.ndim] if magic is None else magic
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape))
        f.write(array.astype(np.uint8).tobytes())
    return path


def cifar_bytes(images: np.ndarray, labels) -> bytes:
    return b"".join(bytes([int(label)]) + image.tobytes() for image, label in zip(images, labels))


def fake_cifar(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(8, 3, 32, 32), dtype=np.uint8)
    labels = np.array([9, 0, 1, 2, 3, 4, 5, 6])
    batches = {f"data_batch_{i}.bin": cifar_bytes(images[i-1:i], labels[i-1:i]) for i in range(1, 6)}
    batches["test_batch.bin"] = cifar_bytes(images[5:], labels[5:])
    return images, labels, batches


def write_cifar_tar(root: Path, batches: dict[str, bytes]) -> Path:
    path = root/"cifar10"/"cifar-10-binary.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_cifar_folder(root: Path, batches: dict[str, bytes]) -> Path:
    folder = root/"cifar10"/"cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name, payload in batches.items(): (folder/name).write_bytes(payload)
    return folder


# ---- data directory ----

def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("HVAE_DATA", raising=False)
    assert resolve_data_dir() == Path.home()/".cache"/"hvae_nb"
    monkeypatch.setenv("HVAE_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir("~/elsewhere") == Path.home()/"elsewhere"


# ---- real MNIST ----

@needs_mnist
@pytest.mark.parametrize("prefix,count", [("train", 60000), ("t10k", 10000)])
def test_read_idx_real_mnist(prefix, count):
    images = read_idx(REAL_DATA/"mnist"/f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(REAL_DATA/"mnist"/f"{prefix}-labels-idx1-ubyte.gz")
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,)
    assert labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels)) == set(range(10))


@needs_mnist
def test_load_mnist_test_split():
    images, labels = load_mnist("test", data_dir=REAL_DATA)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels)[1] == 1135  # the published count of ones in the MNIST test set


@needs_mnist
def test_load_data_mnist_grey_train_binary_test():
    data = load_data("mnist", data_dir=REAL_DATA)
    assert (len(data.train), len(data.test), data.shape) == (60000, 10000, (1, 28, 28))
    assert data.train.array.dtype == np.uint8 and data.test.array.dtype == np.uint8   # bytes at rest
    assert data.train[:100].dtype == torch.float32 and data.dynamic_binarization and data.likelihood == "bernoulli"
    assert len(data.train[:100].unique()) > 2  # grey levels kept for dynamic binarisation
    assert set(data.test[:].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(data.test[:], load_data("mnist", data_dir=REAL_DATA, test_seed=0).test[:])
    # the test bits are one draw over the whole split's grey levels, whatever the chunks they were drawn in
    grey = torch.from_numpy(load_mnist("test", data_dir=REAL_DATA)[0]).float() / 255
    assert torch.equal(data.test[:], torch.bernoulli(grey, generator=torch.Generator().manual_seed(0)))


# ---- fixed binarised MNIST ----

@needs_binarized
@pytest.mark.parametrize("split,rows,mean", [("train", 50000, 0.1306), ("valid", 10000, 0.1311), ("test", 10000, 0.1325)])
def test_binarized_mnist_shapes_and_mean(split, rows, mean):
    images = load_binarized_mnist(split, data_dir=REAL_DATA)
    assert images.shape == (rows, 1, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 1}
    assert abs(images.mean() - mean) < 5e-4


@needs_binarized
def test_binarized_mnist_trainval_adds_the_validation_split():
    plain = load_data("binarized_mnist", data_dir=REAL_DATA)
    full = load_data("binarized_mnist_trainval", data_dir=REAL_DATA)
    valid = load_binarized_mnist("valid", data_dir=REAL_DATA)
    assert (len(plain.train), len(full.train), plain.shape, full.shape) == (50000, 60000, (1, 28, 28), (1, 28, 28))
    assert np.array_equal(full.train.array[:50000], plain.train.array) and np.array_equal(full.train.array[50000:], valid)
    assert np.array_equal(plain.valid.array, valid) and full.valid is None
    assert np.array_equal(full.test.array, plain.test.array) and not full.dynamic_binarization
    assert full.likelihood == "bernoulli" and torch.equal(plain.test[:3], torch.from_numpy(plain.test.array[:3]).float())


def test_binarized_mnist_wrong_shape_and_key(tmp_path):
    path = tmp_path/"binarized_mnist"/"binarized_mnist_packed.npz"
    path.parent.mkdir()
    np.savez(path, train=np.zeros((50000, 98), np.uint8), test=np.zeros((9999, 98), np.uint8))
    with pytest.raises(DataError, match="expected uint8 \\(10000, 98\\)"):
        load_binarized_mnist("test", data_dir=tmp_path)
    with pytest.raises(DataError, match="no array 'valid'"):
        load_binarized_mnist("valid", data_dir=tmp_path)


# ---- CIFAR-10 ----

def test_cifar10_from_tar(tmp_path):
    images, labels, batches = fake_cifar()
    write_cifar_tar(tmp_path, batches)
    train_images, train_labels = load_cifar10("train", data_dir=tmp_path)
    test_images, test_labels = load_cifar10("test", data_dir=tmp_path)
    np.testing.assert_array_equal(train_images, images[:5])
    np.testing.assert_array_equal(test_images, images[5:])
    assert train_labels.tolist() == [9, 0, 1, 2, 3] and train_labels.dtype == np.int64
    assert test_labels.tolist() == [4, 5, 6]
    # the blue plane of the first image is the last 1024 bytes of its record
    blue = np.frombuffer(batches["data_batch_1.bin"][-1024:], np.uint8).reshape(32, 32)
    np.testing.assert_array_equal(train_images[0, 2], blue)


def test_cifar10_from_extracted_folder(tmp_path):
    images, labels, batches = fake_cifar(seed=1)
    write_cifar_folder(tmp_path, batches)
    train_images, train_labels = load_cifar10("train", data_dir=tmp_path)
    np.testing.assert_array_equal(train_images, images[:5])
    assert train_labels.tolist() == labels[:5].tolist()
    data = load_data("cifar10", data_dir=tmp_path)
    assert data.shape == (3, 32, 32) and data.dims == 3072 and data.likelihood == "logistic_mixture"
    assert not data.dynamic_binarization and data.test[:].dtype == torch.float32
    np.testing.assert_array_equal(data.test.uint8(slice(None)).numpy(), images[5:])
    np.testing.assert_array_equal((data.test[:]*255).round().to(torch.uint8).numpy(), images[5:])


def test_cifar10_corrupt_record_length(tmp_path):
    images, labels, batches = fake_cifar()
    batches["test_batch.bin"] = batches["test_batch.bin"][:-5]
    write_cifar_tar(tmp_path, batches)
    with pytest.raises(DataError, match="test_batch.bin: 9214 bytes is not a whole number of 3073-byte records"):
        load_cifar10("test", data_dir=tmp_path)


def test_cifar10_bad_label_and_missing_batch(tmp_path):
    images, labels, batches = fake_cifar()
    batches["test_batch.bin"] = cifar_bytes(images[:1], [10])
    del batches["data_batch_4.bin"]
    write_cifar_folder(tmp_path, batches)
    with pytest.raises(DataError, match="label 10 is outside 0-9"):
        load_cifar10("test", data_dir=tmp_path)
    with pytest.raises(DataError, match="missing data_batch_4.bin"):
        load_cifar10("train", data_dir=tmp_path)


# ---- bad input ----

def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path/"no_such_dir"
    with pytest.raises(DataError) as raised:
        load_mnist("train", data_dir=missing)
    message = str(raised.value)
    assert str(missing/"mnist"/"train-images-idx3-ubyte.gz") in message
    assert "download=True" in message and "https://" in message
    with pytest.raises(DataError, match="no_such_dir.*binarized_mnist_packed.npz"):
        load_binarized_mnist("test", data_dir=missing)
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz.*cifar-10-batches-bin"):
        load_cifar10("test", data_dir=missing)


def test_read_idx_truncated(tmp_path):
    path = write_idx(tmp_path/"images.gz", np.zeros((3, 28, 28), np.uint8))
    with gzip.open(path, "rb") as f: payload = f.read()
    with gzip.open(tmp_path/"short.gz", "wb") as f: f.write(payload[:-10])
    with pytest.raises(DataError, match="short.gz.*2368 bytes.*2358"):
        read_idx(tmp_path/"short.gz")
    compressed = path.read_bytes()
    (tmp_path/"cut.gz").write_bytes(compressed[:len(compressed)//2])
    with pytest.raises(DataError, match="cut.gz: not a complete gzip file"):
        read_idx(tmp_path/"cut.gz")


def test_read_idx_wrong_magic(tmp_path):
    path = write_idx(tmp_path/"labels.gz", np.arange(10), magic=2050)
    with pytest.raises(DataError, match="labels.gz: magic number 2050"):
        read_idx(path)
    (tmp_path/"plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="plain.gz"):
        read_idx(tmp_path/"plain.gz")


def test_read_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path/"i.gz", images)), images)


def test_load_mnist_label_mismatch(tmp_path):
    folder = tmp_path/"mnist"
    folder.mkdir()
    write_idx(folder/"t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(folder/"t10k-labels-idx1-ubyte.gz", np.array([1, 2]))
    with pytest.raises(DataError, match="labels have shape \\(2,\\), expected \\(3,\\)"):
        load_mnist("test", data_dir=tmp_path)


def test_unknown_names():
    with pytest.raises(DataError, match="unknown dataset 'svhn'.*digits.*mnist.*binarized_mnist.*cifar10"):
        load_data("svhn")
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_mnist("valid")
    assert issubclass(DataError, ValueError)


# ---- downloads, over file:// only ----

def test_download_file_checksums(tmp_path):
    source = tmp_path/"source.bin"
    source.write_bytes(os.urandom(3000))
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    out = tmp_path/"out"
    dest = download_file(source.as_uri(), out/"good.bin", sha256=sha256, md5=md5)
    assert dest == out/"good.bin" and dest.read_bytes() == source.read_bytes()

    with pytest.raises(DataError) as raised:
        download_file(source.as_uri(), out/"bad.bin", md5="0"*32)
    message = str(raised.value)
    assert source.as_uri() in message and "0"*32 in message and md5 in message
    assert not (out/"bad.bin").exists()
    assert sorted(p.name for p in out.iterdir()) == ["good.bin"]  # no .part file left behind


def test_download_file_missing_source(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        download_file((tmp_path/"absent.bin").as_uri(), tmp_path/"dest.bin")
    assert list(tmp_path.iterdir()) == []


def test_load_mnist_download_true_fetches_and_verifies(tmp_path, monkeypatch):
    import hvae_nb.data as data
    mirror = tmp_path/"mirror"
    mirror.mkdir()
    images = write_idx(mirror/"t10k-images-idx3-ubyte.gz", np.full((2, 28, 28), 7, np.uint8))
    labels = write_idx(mirror/"t10k-labels-idx1-ubyte.gz", np.array([4, 2]))
    digest = lambda path: hashlib.md5(path.read_bytes()).hexdigest()
    official = dict(data.OFFICIAL_FILES)
    for name, path in [("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)]:
        # first "mirror" does not exist, so the loader must fall back to the second
        official[f"mnist/{name}"] = data.RemoteFile(((tmp_path/"gone"/name).as_uri(), path.as_uri()), md5=digest(path))
    monkeypatch.setattr(data, "OFFICIAL_FILES", official)
    got_images, got_labels = load_mnist("test", data_dir=tmp_path/"store", download=True)
    assert got_images.shape == (2, 1, 28, 28) and got_labels.tolist() == [4, 2]
    assert sorted(p.name for p in (tmp_path/"store"/"mnist").iterdir()) == ["t10k-images-idx3-ubyte.gz",
                                                                              "t10k-labels-idx1-ubyte.gz"]


def test_load_binarized_mnist_download_converts_amat(tmp_path, monkeypatch):
    import hvae_nb.data as data
    rows = {"train": 5, "valid": 3, "test": 2}
    rng = np.random.default_rng(0)
    bits = {split: rng.integers(0, 2, size=(n, 784)) for split, n in rows.items()}
    for split, array in bits.items(): np.savetxt(tmp_path/f"binarized_mnist_{split}.amat", array, fmt="%d")
    monkeypatch.setattr(data, "BINARIZED_MNIST_ROWS", rows)
    # built by hand: Path.as_uri() would percent-encode the {split} placeholder
    monkeypatch.setattr(data, "BINARIZED_MNIST_URL", f"file://{tmp_path}/binarized_mnist_{{split}}.amat")
    test_images = load_binarized_mnist("test", data_dir=tmp_path/"store", download=True)
    np.testing.assert_array_equal(test_images.reshape(2, 784), bits["test"])
    folder = tmp_path/"store"/"binarized_mnist"
    assert [p.name for p in folder.iterdir()] == ["binarized_mnist_packed.npz"]  # no temporary files left
    with np.load(folder/"binarized_mnist_packed.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == ["test", "train", "valid"] and archive["train"].shape == (5, 98)


# ---- digits, binarisation, the registry ----

def test_digits_split_and_data():
    train, train_labels = load_digits_images("train")
    test, test_labels = load_digits_images("test")
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    assert train.dtype == np.float32 and 0 <= train.min() and train.max() <= 1
    assert train_labels.dtype == np.int64 and len(test_labels) == 297
    data = load_data("digits")
    assert isinstance(data, ImageData) and data.shape == (1, 8, 8) and data.dims == 64
    assert data.likelihood == "bernoulli" and data.dynamic_binarization
    assert set(data.test[:].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(data.test[:], load_data("digits", test_seed=0).test[:])
    assert set(DATASETS) == {"digits", "mnist", "binarized_mnist", "binarized_mnist_trainval", "cifar10", "mnist8bit",
                             "imagenet32", "imagenet64", "ffhq256", "ffhq1024", "celeba64", "celebahq256"}


def test_binarize_is_bernoulli():
    grey = torch.full((50000,), 0.25)
    sample = binarize(grey, generator=torch.Generator().manual_seed(0))
    assert set(sample.unique().tolist()) == {0.0, 1.0}
    assert abs(sample.mean().item() - 0.25) < 0.01
    assert torch.equal(sample, binarize(grey, generator=torch.Generator().manual_seed(0)))


def test_image_grid_shape():
    assert image_grid(torch.rand(10, 3, 32, 32), nrow=4, padding=1).shape == (3, 3*34, 4*34)
