"""MNIST on disk: the IDX file format, finding the four files, and fetching them from a mirror."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from shared.dataset import Dataset

# The mirrors torchvision and TensorFlow fetch from; yann.lecun.com now refuses most clients.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# The original distribution's file names, in (train images, train labels, test images, test labels)
# order; every mirror and loader uses exactly these.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
# SHA-256 of the original .gz files (see shared/mnist/SOURCE.md); a mirror is trusted for nothing.
SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}
CACHE_SUBDIR = "mnist-mlp"  # under $XDG_CACHE_HOME or ~/.cache, named after the project
MNIST_DIR_ENV = "MNIST_DIR"  # lets offline machines point at a folder that already holds the files
DOWNLOAD_TIMEOUT = 30.0  # seconds of socket silence before a mirror counts as failed
IMAGE_SHAPE = (28, 28)  # every MNIST digit is 28x28 pixels
CLASSES = 10  # digits 0..9

# IDX type code -> big-endian dtype, as listed in the format's definition on the MNIST page.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
_DOWNLOAD_CHUNK = 1 << 20  # bounded memory while streaming a download to disk
_OFFLINE_HINT = (
    "set MNIST_DIR or pass --data DIR pointing to a folder holding the four files "
    f"({', '.join(name + '.gz' for name in MNIST_FILES)}; uncompressed copies are accepted too)"
)


class IdxError(ValueError):
    """An IDX file that cannot be read, is malformed, or does not hold what MNIST needs."""


class MnistNotFound(ValueError):  # noqa: N818 (reads as the condition callers catch)
    """Some of the four MNIST files are absent from the directory that was searched."""


class MnistDownloadFailed(MnistNotFound):
    """No mirror delivered a file whose SHA-256 matches the expected one."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file (gzipped or raw), native-endian and owning its memory."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdxError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    # Detected by content, not name: people gunzip files in place and keep the .gz suffix.
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxError(f"{path}: corrupt gzip stream: {exc}") from exc
    return _parse_idx(data, path)


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """The array in decompressed IDX bytes; raises before allocating anything partial."""
    if data[:2] != b"\x00\x00":
        found = data[:4].hex(" ") or "an empty file"
        not_gzip = " (named .gz but not gzip data)" if path.suffix == ".gz" else ""
        raise IdxError(
            f"{path}: wrong magic: expected 00 00 <type> <ndim>, found {found}{not_gzip}"
        )
    if len(data) < 4:
        raise IdxError(f"{path}: truncated header: expected 4 magic bytes, found {len(data)}")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise IdxError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    if ndim == 0:
        raise IdxError(f"{path}: IDX header declares zero dimensions")
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise IdxError(
            f"{path}: truncated header: {ndim} dimensions need {header_bytes} bytes, "
            f"found {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    payload = len(data) - header_bytes
    if payload != expected:
        problem = "truncated" if payload < expected else f"{payload - expected} trailing bytes"
        raise IdxError(
            f"{path}: {problem}: expected {expected} bytes of data for shape {shape} "
            f"{dtype.newbyteorder('=').name}, found {payload}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_bytes).reshape(shape)
    # astype copies: the result is writable and independent of the decompressed buffer.
    return values.astype(dtype.newbyteorder("="))


def default_cache_dir() -> Path:
    """Where downloads go: ``$XDG_CACHE_HOME/mnist-mlp``, else ``~/.cache/mnist-mlp``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / CACHE_SUBDIR


def find_mnist_file(directory: Path, name: str) -> Path | None:
    """The copy of ``name`` in ``directory``: gzipped or raw, ``-idx`` or ``.idx`` spelling."""
    dotted = name.replace("-idx", ".idx")  # how the files are named inside the original .gz headers
    for candidate in (f"{name}.gz", name, f"{dotted}.gz", dotted):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Dataset, Dataset]:
    """(train, test) with uint8 features ``(n, 784)`` and uint8 labels ``(n,)``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if data_dir is not None:
        directory, origin = Path(data_dir), "given as the data directory"
    elif os.environ.get(MNIST_DIR_ENV):
        directory, origin = Path(os.environ[MNIST_DIR_ENV]), f"from ${MNIST_DIR_ENV}"
    else:
        directory, origin = cache, "the download cache"
    found = {name: find_mnist_file(directory, name) for name in MNIST_FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing and download:
        # Downloads go to the cache, not a folder the user named: that may be shared or read-only.
        # MIRRORS and SHA256 are passed at call time so tests can point them at a local server.
        download_mnist(cache, mirrors=MIRRORS, sha256=SHA256)
        directory = cache
        found = {name: find_mnist_file(cache, name) for name in MNIST_FILES}
        missing = [name for name, path in found.items() if path is None]
    if missing:
        where = f"{directory} ({origin}{'' if directory.is_dir() else ', which does not exist'})"
        raise MnistNotFound(
            f"MNIST files missing in {where}: {', '.join(missing)} (.gz or uncompressed). "
            f"To fix: {_OFFLINE_HINT}, or pass --download when online to fetch them into {cache}."
        )
    paths = {name: path for name, path in found.items() if path is not None}
    train = _read_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
    test = _read_split(paths[TEST_IMAGES], paths[TEST_LABELS])
    return train, test


def _read_split(images_path: Path, labels_path: Path) -> Dataset:
    """One split, checked to be MNIST-shaped: n 28x28 uint8 images and n labels in 0..9."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise IdxError(
            f"{images_path}: expected uint8 images of shape (n, 28, 28), "
            f"found {images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IdxError(
            f"{labels_path}: expected uint8 labels of shape (n,), "
            f"found {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise IdxError(
            f"count mismatch: {images_path} holds {len(images)} images "
            f"but {labels_path} holds {len(labels)} labels"
        )
    bad = np.flatnonzero(labels >= CLASSES)
    if bad.size:
        raise IdxError(
            f"{labels_path}: {bad.size} labels outside 0..{CLASSES - 1}, "
            f"first {labels[bad[0]]} at index {bad[0]}"
        )
    return Dataset(images.reshape(len(images), -1), labels)


def download_mnist(
    cache_dir: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] = MIRRORS,
    sha256: Mapping[str, str] = SHA256,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> Path:
    """Fetch the four .gz files into ``cache_dir``, skipping verified ones; return ``cache_dir``."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for name in (f"{base}.gz" for base in MNIST_FILES):
        target = cache / name
        if target.is_file() and _file_sha256(target) == sha256[name]:
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            reason = _fetch_verified(url, target, sha256[name], timeout)
            if reason is None:
                break
            failures.append(f"  {url}: {reason}")
        else:
            raise MnistDownloadFailed(
                f"could not download {name} into {cache}; tried:\n"
                + ("\n".join(failures) or "  (no mirrors given)")
                + f"\nTo fix: {_OFFLINE_HINT}."
            )
    return cache


def _fetch_verified(url: str, target: Path, expected_sha256: str, timeout: float) -> str | None:
    """Download ``url`` to ``target`` atomically if its SHA-256 matches; else why it failed."""
    # A temp file in the same directory makes os.replace atomic, so readers never see half a file.
    request = urllib.request.Request(url, headers={"User-Agent": "mnist-mlp-service"})
    handle, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part"
    )
    temp = Path(temp_name)
    digest = hashlib.sha256()
    try:
        with (
            os.fdopen(handle, "wb") as out,
            urllib.request.urlopen(request, timeout=timeout) as resp,
        ):
            received = 0
            while chunk := resp.read(_DOWNLOAD_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
            # read(amt) returns short without raising when the server hangs up early.
            promised = resp.headers.get("Content-Length")
        if promised is not None and promised.isdigit() and received != int(promised):
            return f"transfer cut short: got {received} of {promised} bytes"
        if digest.hexdigest() != expected_sha256:
            return f"SHA-256 mismatch (got {digest.hexdigest()}, expected {expected_sha256})"
        os.replace(temp, target)
        return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return f"cannot connect: {exc.reason}"
    except TimeoutError:
        return f"timed out after {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return f"transfer failed: {type(exc).__name__}: {exc}"
    finally:
        temp.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
