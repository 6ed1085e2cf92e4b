"""MNIST: locate or unpack the bundled IDX files, read them, hand out tensors.

The four IDX files ship inside the package gzip-compressed (``mnist_peft/model/mnist/*.gz``). On first use
they are checked against their sha256, unpacked into ``<root>/MNIST/raw/`` (write to a temporary
file, check, rename, so a half-written file is never trusted): the layout
``torchvision.datasets.MNIST(root, download=False)`` reads. They are read here by a small IDX
reader that gives the tensors torchvision's reader gives (a test holds the two equal); importing
torchvision costs a command about a second, so it is imported only to download missing files.
Everything downstream works on whole normalised tensors: ``x`` is (N, 784) float32, ``y`` is (N,)
int64.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_peft.errors import DataIntegrityError, DataNotFoundError, InvalidArgumentError
from mnist_peft.fileio import current_umask, sha256_file

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "CHECKSUMS",
    "BUNDLE_DIR",
    "MnistSplit",
    "resolve_data_root",
    "ensure_mnist",
    "load_mnist",
    "normalize",
    "read_idx",
    "digit_subset",
    "split_validation",
]

MNIST_MEAN = 0.1307  # the seed's Normalize(mean, std)
MNIST_STD = 0.3081
BUNDLE_DIR = Path(__file__).parent / "mnist"
ENV_DATA = "MNIST_PEFT_DATA"

# sha256 of the uncompressed IDX files (the same as ../shared/mnist/SHA256SUMS).
CHECKSUMS: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

_VERIFIED: set[tuple[str, str]] = set()  # (path, sha256) already checked in this process


@dataclass(frozen=True)
class MnistSplit:
    """One split of MNIST as whole tensors."""

    x: torch.Tensor
    """(N, 784) float32, normalised with the seed's mean and std."""
    y: torch.Tensor
    """(N,) int64 labels 0..9."""

    def __len__(self) -> int:
        return self.y.shape[0]


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir`` > ``$MNIST_PEFT_DATA`` > a per-user cache folder."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mnist_peft"


def _check(path: Path, expected: str) -> None:
    key = (str(path), expected)
    if key in _VERIFIED:
        return
    if sha256_file(path) != expected:
        raise DataIntegrityError(
            f"MNIST file {str(path)!r} is corrupt or truncated (sha256 mismatch); "
            "delete it and run again to unpack a fresh copy from the bundled data",
            path=path,
        )
    _VERIFIED.add(key)


def _unpack(gz_path: Path, dest: Path, expected: str) -> None:
    """Decompress ``gz_path`` to ``dest`` through a temporary file; only a checked file is renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as out:
            try:
                with gzip.open(gz_path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (OSError, EOFError) as exc:  # bad gzip header, truncated stream, CRC error
                raise DataIntegrityError(
                    f"bundled MNIST file {str(gz_path)!r} is corrupt ({exc}); reinstall mnist-peft "
                    f"or put the uncompressed file at {str(dest)!r}",
                    path=gz_path,
                ) from exc
            out.flush()
            os.fsync(out.fileno())
        if sha256_file(Path(tmp)) != expected:
            raise DataIntegrityError(
                f"bundled MNIST file {str(gz_path)!r} does not unpack to the expected sha256; "
                f"reinstall mnist-peft or put the uncompressed file at {str(dest)!r}",
                path=gz_path,
            )
        os.replace(tmp, dest)
        _VERIFIED.add((str(dest), expected))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    bundle_dir: str | os.PathLike[str] | None = None,
    checksums: dict[str, str] | None = None,
) -> Path:
    """Make sure ``<root>/MNIST/raw/`` holds the four checked IDX files and return the root.

    Files already there are checked against their sha256 (once per process); missing ones are
    unpacked from the bundled ``.gz`` copies. Without a bundle, torchvision's download is tried.

    Args:
        root: data root; ``None`` resolves it with :func:`resolve_data_root`.
        bundle_dir: folder of ``<name>.gz`` files (default: the package's bundled copies).
        checksums: expected sha256 per uncompressed file name (default: the real MNIST's).

    Raises:
        DataIntegrityError: a file is corrupt or truncated; the message names it.
        DataNotFoundError: a file is neither present, bundled nor downloadable.
    """
    root = resolve_data_root(root)
    bundle = Path(bundle_dir) if bundle_dir is not None else BUNDLE_DIR
    sums = CHECKSUMS if checksums is None else checksums
    raw = root / "MNIST" / "raw"
    missing = []
    for name, expected in sums.items():
        dest = raw / name
        if dest.exists():
            _check(dest, expected)
        elif (bundle / f"{name}.gz").exists():
            _unpack(bundle / f"{name}.gz", dest, expected)
        else:
            missing.append(name)
    if missing:
        _download(root, missing, sums)
    return root


def _download(root: Path, missing: list[str], sums: dict[str, str]) -> None:
    raw = root / "MNIST" / "raw"
    try:
        from torchvision.datasets import MNIST

        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
    except Exception as exc:  # no network, mirror down, ...: all mean the same to the user
        raise DataNotFoundError(
            f"MNIST files {', '.join(missing)} are not bundled and could not be downloaded ({exc}); "
            f"put the uncompressed IDX files in {str(raw)!r} or point --data-dir / ${ENV_DATA} "
            "at a folder holding MNIST/raw/",
            path=raw,
        ) from exc
    for name in missing:
        _check(raw / name, sums[name])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) images -> (N, 784) float32, as ``ToTensor`` then ``Normalize`` would."""
    x = images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD)


_CACHE: dict[tuple[str, bool], MnistSplit] = {}


def load_mnist(
    train: bool,
    data_dir: str | os.PathLike[str] | None = None,
    **ensure_kwargs: object,
) -> MnistSplit:
    """Load one MNIST split as whole normalised tensors (cached per process).

    Example:
        >>> test = load_mnist(train=False)
        >>> test.x.shape, test.y.shape
        (torch.Size([10000, 784]), torch.Size([10000]))
    """
    root = ensure_mnist(data_dir, **ensure_kwargs)  # type: ignore[arg-type]
    key = (str(root.resolve()), train)
    if key not in _CACHE:
        prefix = "train" if train else "t10k"
        raw = root / "MNIST" / "raw"
        images_path = raw / f"{prefix}-images-idx3-ubyte"
        images = read_idx(images_path, ndim=3)
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte", ndim=1)
        if images.shape[1:] != (28, 28) or not images.shape[0]:
            what = "no images" if not images.shape[0] else f"images of {images.shape[1]}x{images.shape[2]} pixels"
            raise DataIntegrityError(
                f"MNIST file {str(images_path)!r} holds {what}, not 28x28 MNIST images; "
                "delete it and run again to unpack a fresh copy from the bundled data",
                path=images_path,
            )
        if images.shape[0] != labels.shape[0]:
            raise DataIntegrityError(
                f"MNIST files in {str(raw)!r} disagree: {images.shape[0]} images but {labels.shape[0]} labels; "
                "delete them and run again to unpack fresh copies from the bundled data",
                path=raw,
            )
        _CACHE[key] = MnistSplit(normalize(images), labels.to(torch.int64))
    return _CACHE[key]


def read_idx(path: str | os.PathLike[str], *, ndim: int) -> torch.Tensor:
    """An unsigned-byte IDX file (the MNIST format) as a uint8 tensor of ``ndim`` dimensions.

    The header is checked against the file: magic ``0x0000 08 <ndim>``, then ``ndim`` big-endian
    sizes whose product is the number of bytes that follow.

    Raises:
        DataIntegrityError: the file is not such an IDX file; the message names it.
    """
    path = Path(path)
    data = bytearray(path.read_bytes())
    header = 4 + 4 * ndim
    magic = bytes(data[:4])
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)] if len(data) >= header else []
    if magic != bytes((0, 0, 0x08, ndim)) or len(shape) != ndim or math.prod(shape) != len(data) - header:
        raise DataIntegrityError(
            f"{str(path)!r} is not an unsigned-byte IDX file of {ndim} dimension(s) (header {magic.hex()}, sizes {shape}, "
            f"{max(len(data) - header, 0)} data bytes); delete it and run again to unpack a fresh copy from the bundled data",
            path=path,
        )
    if not math.prod(shape):
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).reshape(shape)


def digit_subset(split: MnistSplit, digit: int) -> MnistSplit:
    """The samples of one digit."""
    if not 0 <= digit <= 9:
        raise InvalidArgumentError(f"digit must be 0..9, got {digit!r}")
    mask = split.y == digit
    return MnistSplit(split.x[mask], split.y[mask])


def split_validation(split: MnistSplit, n_val: int, *, seed: int = 0) -> tuple[MnistSplit, MnistSplit]:
    """Hold out ``n_val`` random samples (seeded) as a validation split: ``(train, val)``."""
    if not 0 <= n_val < len(split):
        raise InvalidArgumentError(f"validation size must be in [0, {len(split)}), got {n_val}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(split), generator=g)
    val, tr = perm[:n_val], perm[n_val:]
    return MnistSplit(split.x[tr], split.y[tr]), MnistSplit(split.x[val], split.y[val])
