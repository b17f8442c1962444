"""Network files: ``.npz`` archives written atomically and read without trusting them.

:class:`Npz` reads the ``.npy`` members of an archive only after each header checks out (dtype
kind, shape, and a size the member's stored bytes can hold), so that neither a lying header nor
a zip bomb makes anything large be allocated; nothing is ever unpickled. :func:`write_atomically`
writes next to the target and renames over it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO

import numpy as np

__all__ = ["Npz", "seed_from_words", "seed_to_words", "write_atomically"]


def seed_to_words(seed: int | None) -> np.ndarray:
    """A seed as its 64-bit words, least significant first (any size of integer); empty for ``None``."""
    if seed is None:
        return np.zeros(0, dtype=np.uint64)
    words = [seed & 0xFFFF_FFFF_FFFF_FFFF]
    while seed := seed >> 64:
        words.append(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return np.array(words, dtype=np.uint64)


def seed_from_words(words: np.ndarray) -> int | None:
    """The inverse of :func:`seed_to_words`."""
    if (words < 0).any():
        raise ValueError(f"seed words must be non-negative, got {words.tolist()}")
    return sum(int(w) << (64 * i) for i, w in enumerate(words)) if words.size else None


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write`` into a new file next to it, then rename that over ``path``: a failed
    write leaves any previous file as it was, and no temporary file behind."""
    target = os.path.realpath(path) if os.path.islink(path) else os.fspath(path)
    folder, base = os.path.split(target)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


#: deflate expands at most 1032-fold: a member that claims more than this per compressed byte is lying
_MAX_DEFLATE_RATIO = 1100


class Npz:
    """The ``.npy`` members of an ``.npz`` archive, read without pickles and only after their header checks
    out: dtype kind, shape, and a size that the member's stored bytes can hold (so that neither a lying
    header nor a zip bomb makes anything large be allocated)."""

    def __init__(self, fh: IO[bytes], name: str) -> None:
        self.name = name
        start = fh.read(6)
        fh.seek(0)
        if not start:
            raise self.error("the file is empty")
        if start == b"\x93NUMPY":
            raise self.error("a single .npy array, not an .npz archive")
        try:
            self.zip = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, EOFError, NotImplementedError, OSError, ValueError):
            zipped = start.startswith(b"PK")
            raise self.error("damaged: a truncated or corrupt zip archive" if zipped
                             else "not a zip archive (.npz)") from None
        self.file_size = os.fstat(fh.fileno()).st_size

    def error(self, what: str) -> ValueError:
        return ValueError(f"{self.name} is not a saved backprop network: {what}")

    def has(self, key: str) -> bool:
        return f"{key}.npy" in self.zip.namelist()

    @contextlib.contextmanager
    def _member(self, info: zipfile.ZipInfo, key: str) -> Iterator[IO[bytes]]:
        """Member ``info`` open for reading; what the zip layer finds wrong becomes the file's error."""
        try:
            with self.zip.open(info) as f:
                yield f
        except zipfile.BadZipFile as exc:
            raise self.error(f"damaged: {'CRC check failed' if 'CRC' in str(exc) else exc} for {key}") from None
        except (zlib.error, EOFError, NotImplementedError, OSError) as exc:
            raise self.error(f"damaged: {key} cannot be read ({exc})") from None

    def header(self, key: str, kinds: str, shape_ok: Callable[[tuple[int, ...]], bool],
               expected: str) -> tuple[zipfile.ZipInfo, int, np.dtype, tuple[int, ...], bool]:
        """Check member ``key``'s ``.npy`` header; returns the member, its data offset, dtype, shape and
        Fortran order."""
        try:
            info = self.zip.getinfo(f"{key}.npy")
        except KeyError:
            raise self.error(f"missing {key}") from None
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self.error(f"{key} is encrypted or compressed in a way .npz files never are")
        limit = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO)
        if info.compress_size > self.file_size or info.file_size > limit:
            raise self.error(f"damaged: the zip directory gives {key} {info.file_size} bytes from "
                             f"{info.compress_size} stored, in a file of {self.file_size} bytes")
        with self._member(info, key) as f:
            try:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy version {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
            except ValueError as exc:
                raise self.error(f"damaged: {key} has no valid .npy header ({exc})") from None
            offset = f.tell()
        if dtype.kind not in kinds or dtype.hasobject:
            raise self.error(f"{key} must hold {_KIND_NAMES[kinds]}, got {dtype}")
        if any(n < 0 for n in shape) or not shape_ok(shape):
            raise self.error(f"{key} must be {expected}, got shape {shape}")
        if info.file_size != offset + int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise self.error(f"damaged: {key} declares shape {shape} of {dtype} but holds "
                             f"{info.file_size - offset} bytes of data")
        return info, offset, dtype, shape, fortran

    def read(self, key: str, kinds: str, shape_ok: Callable[[tuple[int, ...]], bool], expected: str) -> np.ndarray:
        """Member ``key`` after :meth:`header`'s checks, its CRC verified."""
        info, offset, dtype, shape, fortran = self.header(key, kinds, shape_ok, expected)
        with self._member(info, key) as f:
            f.read(offset)
            data = f.read(info.file_size - offset)
            if f.read(1) or len(data) != info.file_size - offset:
                raise zipfile.BadZipFile("its size differs from the zip directory")
        flat = np.frombuffer(data, dtype=dtype) if data else np.empty(0, dtype=dtype)
        return flat.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="), copy=False)


_KIND_NAMES = {"iu": "integers", "iuf": "real numbers", "U": "a string"}
