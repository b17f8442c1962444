"""backprop.datasets: IDX reading and the MNIST loader, on small files the tests write themselves."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from backprop.datasets import IDXError, load_mnist, read_idx, write_idx


def raw_idx(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def fake_mnist(directory: Path, rng: np.random.Generator, n_train: int = 12, n_test: int = 5, gz: bool = True,
               rows: int = 4, cols: int = 3) -> dict[str, np.ndarray]:
    """Write the four MNIST files by hand (big-endian header, unsigned bytes), as the real ones are laid out."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, rows, cols), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, rows, cols), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        data = raw_idx(0x08, a.shape, a.tobytes())
        if gz:
            with gzip.open(directory / (name + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist(tmp_path, rng, gz):
    a = fake_mnist(tmp_path, rng, gz=gz)
    (X_train, y_train), (X_test, y_test) = load_mnist(tmp_path)
    assert X_train.shape == (12, 12) and X_test.shape == (5, 12) and X_train.dtype == np.float32
    np.testing.assert_allclose(X_train, a["train-images-idx3-ubyte"].reshape(12, -1) / 255, rtol=1e-6)
    np.testing.assert_array_equal(y_train, a["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(y_test, a["t10k-labels-idx1-ubyte"])
    assert y_train.dtype == np.uint8 and 0 <= X_train.min() and X_train.max() <= 1
    (raw, _), _ = load_mnist(str(tmp_path), normalize=False, flatten=False, dtype=np.float64)
    assert raw.shape == (12, 4, 3) and raw.dtype == np.float64
    np.testing.assert_array_equal(raw, a["train-images-idx3-ubyte"])


def test_mixed_and_dotted_file_names(tmp_path, rng):
    a = fake_mnist(tmp_path, rng, gz=False)
    # some mirrors spell it train-images.idx3-ubyte; some files compressed, some not
    (tmp_path / "train-images-idx3-ubyte").rename(tmp_path / "train-images.idx3-ubyte")
    data = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(data)
    (X_train, _), (_, y_test) = load_mnist(tmp_path, normalize=False)
    np.testing.assert_array_equal(X_train, a["train-images-idx3-ubyte"].reshape(12, -1))
    np.testing.assert_array_equal(y_test, a["t10k-labels-idx1-ubyte"])


def test_missing_directory_and_file(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    fake_mnist(tmp_path, rng)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("data,match", [
    (b"\x00\x00", "truncated.*4-byte"),
    (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number 0x01000801"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number"),
    (b"\x00\x00\x08\x00", "zero dimensions"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
    (raw_idx(0x08, (3, 2), bytes(5)), "truncated: shape \\(3, 2\\).*needs 6 data bytes, the file has 5"),
    (raw_idx(0x08, (2,), bytes(3)), "1 unexpected bytes"),
    (raw_idx(0x0C, (2,), bytes(7)), "truncated"),
])
def test_malformed_files_are_named(tmp_path, data, match):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(IDXError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_gzip_problems(tmp_path):
    plain_gz = tmp_path / "x-idx1-ubyte"
    with gzip.open(plain_gz, "wb") as fh:
        fh.write(raw_idx(0x08, (2,), bytes(2)))
    with pytest.raises(IDXError, match="gzip-compressed without a .gz name"):
        read_idx(plain_gz)
    broken = tmp_path / "y-idx1-ubyte.gz"
    broken.write_bytes(gzip.compress(raw_idx(0x08, (100,), bytes(100)))[:30])
    with pytest.raises(IDXError, match="gzip"):
        read_idx(broken)


def test_truncated_mnist_file_in_the_loader(tmp_path, rng):
    fake_mnist(tmp_path, rng, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(IDXError, match="train-images-idx3-ubyte: truncated"):
        load_mnist(tmp_path)


def test_inconsistent_mnist_files(tmp_path, rng):
    fake_mnist(tmp_path, rng, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(ValueError, match="12 images .* but 11 labels"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10, np.uint8))
    with pytest.raises(ValueError, match="0..9"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(12, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 12), np.uint8))
    with pytest.raises(ValueError, match="3-D"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_read_round_trip(tmp_path, rng, dtype, suffix):
    a = (rng.normal(size=(3, 4, 2)) * 100).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, a)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype).newbyteorder("=") and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    if dtype in (np.int16, np.int32, np.float32, np.float64) and not suffix:
        big_endian_first = a.ravel()[:1].astype(np.dtype(dtype).newbyteorder(">")).tobytes()
        assert path.read_bytes()[16:16 + a.itemsize] == big_endian_first
    with pytest.raises(TypeError, match="IDX cannot store"):
        write_idx(tmp_path / "b.idx", np.zeros(2, np.int64))
