"""IDX reading, MNIST discovery and the mirror downloader, against files and a server made here."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared import mnist
from shared.mnist import (
    MNIST_FILES,
    IdxError,
    MnistDownloadFailed,
    MnistNotFound,
    download_mnist,
    load_mnist,
    read_idx,
)

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "mnist"
TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
TRAIN_DIGIT_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_DIGIT_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(values: np.ndarray, type_code: int | None = None) -> bytes:
    """IDX encoding written from the spec: 00 00 type ndim, big-endian u32 dims, big-endian data."""
    values = np.asarray(values)
    code = TYPE_CODES[values.dtype.str[1:]] if type_code is None else type_code
    header = bytes([0, 0, code, values.ndim]) + np.array(values.shape, dtype=">u4").tobytes()
    return header + values.astype(values.dtype.newbyteorder(">")).tobytes()


def write_file(path: Path, data: bytes, *, gz: bool = False) -> Path:
    """``data`` written to ``path``, gzip-compressed when asked."""
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random 28x28 uint8 images and digit labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, size=count, dtype=np.uint8)


def write_mnist_dir(directory: Path, *, gz: bool = True, name=lambda base: base) -> dict:
    """A tiny fake MNIST (3 train, 2 test) in ``directory``; returns the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = digits(3, seed=1)
    test_images, test_labels = digits(2, seed=2)
    arrays = dict(
        zip(MNIST_FILES, [train_images, train_labels, test_images, test_labels], strict=True)
    )
    for base, values in arrays.items():
        filename = name(base) + (".gz" if gz else "")
        write_file(directory / filename, idx_bytes(values), gz=gz)
    return arrays


# --- read_idx --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("kind", list(TYPE_CODES))
def test_read_idx_round_trips_every_type_exactly(tmp_path, kind, gz):
    rng = np.random.default_rng(0)
    dtype = np.dtype(kind)
    if dtype.kind == "f":
        values = rng.standard_normal((2, 3, 4)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=(2, 3, 4), endpoint=True, dtype=dtype)
    path = write_file(tmp_path / "values.idx", idx_bytes(values), gz=gz)

    loaded = read_idx(path)

    assert loaded.dtype == dtype and loaded.dtype.isnative
    assert loaded.shape == values.shape
    np.testing.assert_array_equal(loaded, values)
    assert loaded.flags.writeable and loaded.flags.owndata


@settings(max_examples=40, deadline=None)
@given(
    values=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int16, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    )
)
def test_read_idx_round_trips_any_shape(tmp_path_factory, values):
    path = write_file(tmp_path_factory.mktemp("idx") / "a.idx", idx_bytes(values))
    np.testing.assert_array_equal(read_idx(path), values)


def test_gzip_is_detected_by_content_not_name(tmp_path):
    values = np.arange(10, dtype=np.uint8)
    gzipped_without_suffix = write_file(tmp_path / "labels", idx_bytes(values), gz=True)
    raw_with_gz_suffix = write_file(tmp_path / "labels.gz", idx_bytes(values))

    np.testing.assert_array_equal(read_idx(gzipped_without_suffix), values)
    np.testing.assert_array_equal(read_idx(raw_with_gz_suffix), values)


def test_wrong_magic_is_named(tmp_path):
    path = write_file(tmp_path / "train-images-idx3-ubyte.gz", b"PK\x03\x04 not an idx file")
    with pytest.raises(IdxError, match="wrong magic") as caught:
        read_idx(path)
    assert "train-images-idx3-ubyte.gz" in str(caught.value)
    assert "not gzip" in str(caught.value)


def test_empty_file_is_wrong_magic(tmp_path):
    with pytest.raises(IdxError, match=r"wrong magic.*empty file"):
        read_idx(write_file(tmp_path / "empty", b""))


def test_unknown_type_code_is_named(tmp_path):
    path = write_file(tmp_path / "odd.idx", idx_bytes(np.zeros(4, np.uint8), type_code=0x0A))
    with pytest.raises(IdxError, match=r"odd\.idx: unknown IDX type code 0x0A"):
        read_idx(path)


def test_truncated_header_is_an_error(tmp_path):
    data = idx_bytes(np.zeros((2, 2), np.uint8))[:7]
    with pytest.raises(IdxError, match="truncated header"):
        read_idx(write_file(tmp_path / "short.idx", data))


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_truncated_payload_is_an_error(tmp_path, gz):
    data = idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-10]
    path = write_file(tmp_path / "train-images-idx3-ubyte", data, gz=gz)
    with pytest.raises(IdxError) as caught:
        read_idx(path)
    message = str(caught.value)
    assert "train-images-idx3-ubyte" in message
    assert "truncated: expected 3920 bytes" in message and "found 3910" in message


def test_trailing_bytes_are_an_error(tmp_path):
    data = idx_bytes(np.zeros(6, np.int32)) + b"\x00\x01\x02"
    with pytest.raises(IdxError, match=r"labels\.idx: 3 trailing bytes: expected 24 bytes"):
        read_idx(write_file(tmp_path / "labels.idx", data))


def test_corrupt_gzip_stream_is_an_error(tmp_path):
    compressed = bytearray(gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32))))
    compressed[len(compressed) // 2] ^= 0xFF
    with pytest.raises(IdxError, match=r"bad\.gz: corrupt gzip stream"):
        read_idx(write_file(tmp_path / "bad.gz", bytes(compressed)))


def test_cut_off_gzip_stream_is_an_error(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    with pytest.raises(IdxError, match="corrupt gzip stream"):
        read_idx(write_file(tmp_path / "cut.gz", compressed[:-20]))


def test_unreadable_file_is_an_idx_error(tmp_path):
    with pytest.raises(IdxError, match=r"absent\.gz: cannot read"):
        read_idx(tmp_path / "absent.gz")


# --- load_mnist ------------------------------------------------------------------------------


@pytest.fixture
def no_mnist_env(monkeypatch, tmp_path):
    """No MNIST_DIR, and a cache under tmp_path, so the user's real setup cannot leak in."""
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def assert_loaded(train, test, arrays):
    assert train.features.shape == (3, 784) and test.features.shape == (2, 784)
    assert train.features.dtype == np.uint8 and train.labels.dtype == np.uint8
    images, labels = arrays[mnist.TRAIN_IMAGES], arrays[mnist.TRAIN_LABELS]
    np.testing.assert_array_equal(train.features, images.reshape(3, 784))
    np.testing.assert_array_equal(train.labels, labels)
    np.testing.assert_array_equal(test.features, arrays[mnist.TEST_IMAGES].reshape(2, 784))
    np.testing.assert_array_equal(test.labels, arrays[mnist.TEST_LABELS])


@pytest.mark.parametrize(
    ("gz", "name"),
    [
        (True, lambda base: base),
        (False, lambda base: base),
        (True, lambda base: base.replace("-idx", ".idx")),
        (False, lambda base: base.replace("-idx", ".idx")),
    ],
    ids=["gz", "raw", "dotted-gz", "dotted-raw"],
)
def test_load_mnist_from_a_directory(tmp_path, no_mnist_env, gz, name):
    arrays = write_mnist_dir(tmp_path / "data", gz=gz, name=name)
    train, test = load_mnist(tmp_path / "data")
    assert_loaded(train, test, arrays)


def test_mnist_dir_environment_variable_is_honoured(tmp_path, monkeypatch):
    arrays = write_mnist_dir(tmp_path / "from-env")
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert_loaded(*load_mnist(), arrays)


def test_explicit_directory_beats_mnist_dir(tmp_path, monkeypatch):
    arrays = write_mnist_dir(tmp_path / "explicit")
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "nowhere"))
    assert_loaded(*load_mnist(tmp_path / "explicit"), arrays)


def test_cache_directory_is_the_last_resort(tmp_path, no_mnist_env):
    arrays = write_mnist_dir(tmp_path / "xdg-cache" / "mnist-mlp")
    assert_loaded(*load_mnist(), arrays)
    assert mnist.default_cache_dir() == tmp_path / "xdg-cache" / "mnist-mlp"


def test_missing_files_say_which_where_and_how_to_fix(tmp_path, no_mnist_env):
    write_mnist_dir(tmp_path / "data")
    (tmp_path / "data" / "train-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "data" / "t10k-images-idx3-ubyte.gz").unlink()

    with pytest.raises(MnistNotFound) as caught:
        load_mnist(tmp_path / "data")

    message = str(caught.value)
    assert str(tmp_path / "data") in message
    missing_part = message.split("To fix")[0]
    assert "train-labels-idx1-ubyte" in missing_part and "t10k-images-idx3-ubyte" in missing_part
    assert "train-images-idx3-ubyte" not in missing_part
    assert "MNIST_DIR" in message and "--data DIR" in message and "--download" in message


def test_missing_directory_is_reported_as_such(tmp_path, no_mnist_env):
    with pytest.raises(MnistNotFound, match="does not exist") as caught:
        load_mnist()
    assert str(tmp_path / "xdg-cache" / "mnist-mlp") in str(caught.value)
    assert all(base in str(caught.value) for base in MNIST_FILES)


def test_count_mismatch_names_both_files_and_counts(tmp_path, no_mnist_env):
    write_mnist_dir(tmp_path)
    write_file(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(5, np.uint8)), gz=True)
    with pytest.raises(IdxError, match="count mismatch") as caught:
        load_mnist(tmp_path)
    message = str(caught.value)
    assert "t10k-images-idx3-ubyte.gz holds 2 images" in message
    assert "t10k-labels-idx1-ubyte.gz holds 5 labels" in message


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((3, 27, 28), np.uint8),
        np.zeros((3, 784), np.uint8),
        np.zeros((3, 28, 28), np.int16),
    ],
    ids=["27x28", "flat", "int16"],
)
def test_wrong_image_size_or_type_is_an_error(tmp_path, no_mnist_env, images):
    write_mnist_dir(tmp_path)
    write_file(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(images), gz=True)
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte\.gz: expected uint8 images") as c:
        load_mnist(tmp_path)
    assert str(images.shape) in str(c.value)


def test_label_file_with_two_dims_is_an_error(tmp_path, no_mnist_env):
    write_mnist_dir(tmp_path)
    write_file(
        tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros((2, 1), np.uint8)), gz=True
    )
    with pytest.raises(IdxError, match=r"t10k-labels-idx1-ubyte\.gz: expected uint8 labels"):
        load_mnist(tmp_path)


def test_label_out_of_range_is_an_error(tmp_path, no_mnist_env):
    write_mnist_dir(tmp_path)
    labels = np.array([3, 10, 255], np.uint8)
    write_file(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(labels), gz=True)
    with pytest.raises(IdxError) as caught:
        load_mnist(tmp_path)
    message = str(caught.value)
    assert "train-labels-idx1-ubyte.gz" in message
    assert "2 labels outside 0..9, first 10 at index 1" in message


# --- download_mnist against a real HTTP server on loopback ------------------------------------


class MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from a folder; paths under /short/ promise more bytes than they send."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b only the start")
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format, *args):
        pass  # keep pytest output to the failures


@pytest.fixture
def mirror_server(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, request log)."""
    # A proxy from the environment must not see loopback requests: tests never leave the machine.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(MirrorHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    server.shutdown()
    server.server_close()
    thread.join()


def publish(mirror_dir: Path, files: dict[str, bytes]) -> None:
    """Put ``files`` (name -> bytes) where the server serves them."""
    mirror_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (mirror_dir / name).write_bytes(data)


@pytest.fixture
def fake_release(tmp_path):
    """Tiny gzipped MNIST files and the hash table that makes them the 'correct' ones."""
    arrays = write_mnist_dir(tmp_path / "release")
    files = {f"{base}.gz": (tmp_path / "release" / f"{base}.gz").read_bytes() for base in arrays}
    table = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return files, table, arrays


def test_download_fetches_verified_files(tmp_path, mirror_server, fake_release):
    base, requests = mirror_server
    files, table, _ = fake_release
    publish(tmp_path / "www" / "good", files)
    cache = tmp_path / "cache"

    assert download_mnist(cache, mirrors=[f"{base}/good/"], sha256=table) == cache

    assert sorted(os.listdir(cache)) == sorted(files)
    for name, data in files.items():
        assert (cache / name).read_bytes() == data
    assert len(requests) == 4


def test_download_skips_files_already_verified(tmp_path, mirror_server, fake_release):
    base, requests = mirror_server
    files, table, _ = fake_release
    publish(tmp_path / "www" / "good", files)
    cache = tmp_path / "cache"
    download_mnist(cache, mirrors=[f"{base}/good/"], sha256=table)
    stale = "t10k-labels-idx1-ubyte.gz"
    (cache / stale).write_bytes(b"an old, different file")
    requests.clear()

    download_mnist(cache, mirrors=[f"{base}/good/"], sha256=table)

    assert requests == [f"/good/{stale}"]
    assert (cache / stale).read_bytes() == files[stale]


def test_corrupt_mirror_falls_through_to_the_next(tmp_path, mirror_server, fake_release):
    base, requests = mirror_server
    files, table, _ = fake_release
    publish(tmp_path / "www" / "bad", {name: data[:-1] + b"!" for name, data in files.items()})
    publish(tmp_path / "www" / "good", files)
    cache = tmp_path / "cache"

    download_mnist(cache, mirrors=[f"{base}/bad/", f"{base}/good"], sha256=table)

    for name, data in files.items():
        assert (cache / name).read_bytes() == data
    first = "train-images-idx3-ubyte.gz"
    assert requests[:2] == [f"/bad/{first}", f"/good/{first}"]
    assert sorted(os.listdir(cache)) == sorted(files)


def test_all_mirrors_failing_names_every_mirror_and_leaves_nothing(
    tmp_path, mirror_server, fake_release
):
    base, _ = mirror_server
    files, table, _ = fake_release
    publish(tmp_path / "www" / "bad", {name: b"garbage" for name in files})
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    mirrors = [f"{base}/absent/", f"{base}/bad/", f"{base}/short/", "http://127.0.0.1:1/mnist/"]
    cache = tmp_path / "cache"

    with pytest.raises(MnistDownloadFailed) as caught:
        download_mnist(cache, mirrors=mirrors, sha256=table, timeout=5)

    message = str(caught.value)
    name = "train-images-idx3-ubyte.gz"
    assert f"{base}/absent/{name}: HTTP 404" in message
    assert f"{base}/bad/{name}: SHA-256 mismatch" in message
    assert f"{base}/short/{name}: transfer cut short: got 17 of 100000 bytes" in message
    assert f"http://127.0.0.1:1/mnist/{name}: cannot connect" in message
    assert "MNIST_DIR" in message
    assert isinstance(caught.value, MnistNotFound)
    assert os.listdir(cache) == []


def test_load_mnist_downloads_missing_files_into_the_cache(
    tmp_path, mirror_server, fake_release, monkeypatch, no_mnist_env
):
    base, _ = mirror_server
    files, table, arrays = fake_release
    publish(tmp_path / "www" / "good", files)
    monkeypatch.setattr(mnist, "MIRRORS", (f"{base}/good/",))
    monkeypatch.setattr(mnist, "SHA256", table)
    cache = tmp_path / "cache"

    train, test = load_mnist(tmp_path / "empty", download=True, cache_dir=cache)

    assert_loaded(train, test, arrays)
    assert sorted(os.listdir(cache)) == sorted(files)


# --- the real files beside the repository ---------------------------------------------------

needs_real_mnist = pytest.mark.skipif(
    not all((REAL_MNIST / f"{base}.gz").is_file() for base in MNIST_FILES),
    reason=f"real MNIST .gz files not found in {REAL_MNIST}",
)


@needs_real_mnist
def test_real_mnist_loads_with_the_published_counts():
    started = time.perf_counter()
    train, test = load_mnist(REAL_MNIST)
    elapsed = time.perf_counter() - started

    assert train.features.shape == (60000, 784) and test.features.shape == (10000, 784)
    assert train.features.dtype == np.uint8 and train.labels.dtype == np.uint8
    for split in (train, test):
        assert split.features.min() == 0 and split.features.max() == 255
    assert np.bincount(train.labels, minlength=10).tolist() == TRAIN_DIGIT_COUNTS
    assert np.bincount(test.labels, minlength=10).tolist() == TEST_DIGIT_COUNTS
    # Generous for slow CI machines; a Python-level loop over pixels would take minutes.
    assert elapsed < 5.0


@needs_real_mnist
def test_hash_table_matches_the_real_files(tmp_path, mirror_server):
    base, _ = mirror_server
    publish(
        tmp_path / "www" / "real",
        {f"{b}.gz": (REAL_MNIST / f"{b}.gz").read_bytes() for b in MNIST_FILES},
    )
    cache = tmp_path / "cache"

    download_mnist(cache, mirrors=[f"{base}/real/"])  # the default, real SHA-256 table

    for base_name in MNIST_FILES:
        name = f"{base_name}.gz"
        assert (cache / name).read_bytes() == (REAL_MNIST / name).read_bytes()
