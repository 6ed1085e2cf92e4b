"""The MNIST loader: bundled files, checksums, corruption, the IDX reader against torchvision's."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_peft.errors import DataIntegrityError, DataNotFoundError
from mnist_peft.model.data import (
    BUNDLE_DIR,
    CHECKSUMS,
    MNIST_MEAN,
    MNIST_STD,
    digit_subset,
    ensure_mnist,
    load_mnist,
    read_idx,
    resolve_data_root,
    split_validation,
)

N_TRAIN, N_TEST = 30, 12


def _idx_images(images: torch.Tensor) -> bytes:
    return struct.pack(">IIII", 2051, images.shape[0], 28, 28) + images.numpy().tobytes()


def _idx_labels(labels: torch.Tensor) -> bytes:
    return struct.pack(">II", 2049, labels.shape[0]) + labels.numpy().astype("uint8").tobytes()


@pytest.fixture()
def tiny_bundle(tmp_path: Path):
    """A bundle of four tiny gzip'd IDX files (real format) and their checksums."""
    g = torch.Generator().manual_seed(0)
    files = {
        "train-images-idx3-ubyte": _idx_images(torch.randint(0, 256, (N_TRAIN, 28, 28), dtype=torch.uint8, generator=g)),
        "train-labels-idx1-ubyte": _idx_labels(torch.arange(N_TRAIN) % 10),
        "t10k-images-idx3-ubyte": _idx_images(torch.randint(0, 256, (N_TEST, 28, 28), dtype=torch.uint8, generator=g)),
        "t10k-labels-idx1-ubyte": _idx_labels((torch.arange(N_TEST) * 3) % 10),
    }
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name, data in files.items():
        (bundle / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return bundle, sums, files


def test_tiny_bundle_unpacks_and_reads_back_the_bytes_normalised(tmp_path: Path, tiny_bundle) -> None:
    bundle, sums, files = tiny_bundle
    root = tmp_path / "root"
    ensure_mnist(root, bundle_dir=bundle, checksums=sums)
    for name, data in files.items():
        assert (root / "MNIST" / "raw" / name).read_bytes() == data
    train = load_mnist(train=True, data_dir=str(root), bundle_dir=bundle, checksums=sums)
    test = load_mnist(train=False, data_dir=str(root), bundle_dir=bundle, checksums=sums)
    assert train.x.shape == (N_TRAIN, 784) and train.x.dtype == torch.float32
    assert test.y.tolist() == [(i * 3) % 10 for i in range(N_TEST)]
    raw = torch.frombuffer(bytearray(files["train-images-idx3-ubyte"][16:]), dtype=torch.uint8).reshape(N_TRAIN, 784)
    expected = (raw.float() / 255 - MNIST_MEAN) / MNIST_STD  # ToTensor then Normalize, by hand
    torch.testing.assert_close(train.x, expected, rtol=0, atol=1e-6)


def test_corrupt_bundled_file_is_named_and_leaves_nothing_behind(tmp_path: Path, tiny_bundle) -> None:
    bundle, sums, _ = tiny_bundle
    gz = bundle / "t10k-images-idx3-ubyte.gz"
    data = bytearray(gz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip bits inside the deflate stream
    gz.write_bytes(bytes(data))
    root = tmp_path / "root"
    with pytest.raises(DataIntegrityError) as err:
        ensure_mnist(root, bundle_dir=bundle, checksums=sums)
    assert "t10k-images-idx3-ubyte" in str(err.value)
    raw = root / "MNIST" / "raw"
    assert not (raw / "t10k-images-idx3-ubyte").exists()
    assert not [p for p in raw.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_truncated_file_in_data_root_is_refused_with_its_name(tmp_path: Path, tiny_bundle) -> None:
    bundle, sums, files = tiny_bundle
    root = tmp_path / "root"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-labels-idx1-ubyte").write_bytes(files["train-labels-idx1-ubyte"][:-5])
    with pytest.raises(DataIntegrityError) as err:
        ensure_mnist(root, bundle_dir=bundle, checksums=sums)
    assert err.value.path == raw / "train-labels-idx1-ubyte"
    assert "delete it" in str(err.value)


def test_missing_files_without_bundle_or_network_say_where_to_put_them(tmp_path: Path, tiny_bundle, monkeypatch) -> None:
    _, sums, _ = tiny_bundle
    import torchvision.datasets

    def no_network(*args, **kwargs):  # what torchvision raises with no route to its mirrors
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    with pytest.raises(DataNotFoundError) as err:
        ensure_mnist(tmp_path / "root", bundle_dir=tmp_path / "empty", checksums=sums)
    assert str(tmp_path / "root" / "MNIST" / "raw") in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_data_root_precedence(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNIST_PEFT_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("MNIST_PEFT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_root() == tmp_path / "cache" / "mnist_peft"


def test_bundled_files_match_the_real_mnist_checksums() -> None:
    assert sorted(p.name for p in BUNDLE_DIR.glob("*.gz")) == sorted(f"{n}.gz" for n in CHECKSUMS)
    for name, expected in CHECKSUMS.items():
        assert hashlib.sha256(gzip.decompress((BUNDLE_DIR / f"{name}.gz").read_bytes())).hexdigest() == expected


def test_real_mnist_label_counts(mnist_train, mnist_test) -> None:
    assert torch.bincount(mnist_train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist_test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(mnist_train.x.mean())) < 0.01 and abs(float(mnist_train.x.std()) - 1) < 0.01  # normalised


def test_digit_subset_and_validation_split(mnist_test) -> None:
    nines = digit_subset(mnist_test, 9)
    assert len(nines) == 1009 and bool((nines.y == 9).all())
    train, val = split_validation(mnist_test, 1000, seed=3)
    assert len(train) == 9000 and len(val) == 1000
    again = split_validation(mnist_test, 1000, seed=3)[1]
    assert torch.equal(val.x, again.x)
    with pytest.raises(ValueError):
        digit_subset(mnist_test, 10)


@pytest.mark.parametrize("train", [True, False])
def test_the_idx_reader_gives_torchvisions_tensors_on_the_real_files(data_root: Path, train: bool) -> None:
    from torchvision.datasets import MNIST

    ds = MNIST(str(data_root), train=train, download=False)
    split = load_mnist(train=train, data_dir=str(data_root))
    prefix = "train" if train else "t10k"
    images = read_idx(data_root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", ndim=3)
    assert images.dtype == ds.data.dtype and torch.equal(images, ds.data)
    assert split.y.dtype == ds.targets.dtype and torch.equal(split.y, ds.targets)
    assert torch.equal(split.x, (ds.data.reshape(len(ds), -1).float() / 255 - MNIST_MEAN) / MNIST_STD)


@pytest.mark.parametrize(
    ("blob", "what"),
    [
        (struct.pack(">II", 2049, 3) + b"\x01\x02", "sizes [3], 2 data bytes"),  # truncated
        (struct.pack(">II", 2049, 3) + b"\x01\x02\x03\x04", "sizes [3], 4 data bytes"),  # trailing bytes
        (struct.pack(">II", 2051, 3) + b"\x01\x02\x03", "header 00000803"),  # an idx3 magic where idx1 is read
        (struct.pack(">II", 0x0D01, 3) + b"\x00" * 12, "header 00000d01"),  # floats, not unsigned bytes
        (b"\x00\x00", "sizes []"),  # shorter than its header
    ],
)
def test_a_malformed_idx_file_is_refused_with_its_name(tmp_path: Path, blob: bytes, what: str) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(blob)
    with pytest.raises(DataIntegrityError) as err:
        read_idx(path, ndim=1)
    assert str(path) in str(err.value) and what in str(err.value) and err.value.path == path


def test_images_and_labels_that_disagree_are_refused(tmp_path: Path, tiny_bundle) -> None:
    bundle, sums, files = tiny_bundle
    short = struct.pack(">II", 2049, N_TEST - 1) + files["t10k-labels-idx1-ubyte"][8:-1]
    (bundle / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(short, mtime=0))
    sums = {**sums, "t10k-labels-idx1-ubyte": hashlib.sha256(short).hexdigest()}
    with pytest.raises(DataIntegrityError) as err:
        load_mnist(train=False, data_dir=str(tmp_path / "root"), bundle_dir=bundle, checksums=sums)
    assert f"{N_TEST} images but {N_TEST - 1} labels" in str(err.value)


def test_loading_mnist_does_not_import_torchvision(data_root: Path) -> None:
    # torchvision costs every command about a second; it is needed only to download missing files
    code = "import sys; from mnist_peft.model.data import load_mnist; load_mnist(train=False); print('torchvision' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "MNIST_PEFT_DATA": str(data_root)}
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize(("n", "rows", "cols"), [(0, 28, 28), (N_TEST, 14, 56)])
def test_images_that_are_not_28x28_mnist_images_are_refused(tmp_path: Path, tiny_bundle, n: int, rows: int, cols: int) -> None:
    bundle, sums, _ = tiny_bundle
    blob = struct.pack(">IIII", 2051, n, rows, cols) + bytes(n * rows * cols)
    (bundle / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(blob, mtime=0))
    sums = {**sums, "t10k-images-idx3-ubyte": hashlib.sha256(blob).hexdigest()}
    with pytest.raises(DataIntegrityError) as err:
        load_mnist(train=False, data_dir=str(tmp_path / "root"), bundle_dir=bundle, checksums=sums)
    what = "holds no images" if not n else f"holds images of {rows}x{cols} pixels"
    assert what in str(err.value) and "t10k-images-idx3-ubyte" in str(err.value)
