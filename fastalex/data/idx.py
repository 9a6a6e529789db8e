"""IDX files (the MNIST / Fashion-MNIST format), gzipped or raw.

    array = read_idx("train-images-idx3-ubyte.gz")     # numpy array, e.g. uint8 (60000, 28, 28)

Layout: two zero bytes, a type code, the number of dimensions; one big-endian uint32 per
dimension; then the values, big-endian, row-major. Anything else is an IDXError naming the file.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from fastalex.data.errors import DataError

__all__ = ["IDXError", "IDX_DTYPES", "parse_idx", "read_idx"]

# type code -> numpy dtype (big-endian where it matters)
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"


class IDXError(DataError, ValueError):
    """A file is not a valid IDX file (bad magic number, sizes that do not match, corrupt gzip)."""


def parse_idx(buf: bytes, name: str = "<bytes>") -> np.ndarray:
    """The array an IDX file's (uncompressed) bytes hold: native byte order, writable, its own memory."""
    if len(buf) < 4:
        raise IDXError(f"{name}: not an IDX file: {len(buf)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = buf[:2], buf[2], buf[3]
    if zero != b"\0\0" or code not in IDX_DTYPES or ndim < 1:
        raise IDXError(f"{name}: not an IDX file: magic number 0x{buf[:4].hex()} (expected 0x0000TTNN with type "
                       f"TT in {{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}} and NN >= 1 dimensions)")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise IDXError(f"{name}: truncated IDX header: {ndim} dimensions need {header} bytes, the file has {len(buf)}")
    shape = tuple(int(d) for d in np.frombuffer(buf, ">u4", ndim, 4))
    dtype = IDX_DTYPES[code]
    want = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) != want:
        what = "truncated" if len(buf) < want else "trailing bytes after the data"
        raise IDXError(f"{name}: {what}: shape {shape} of {dtype.name} needs {want} bytes "
                       f"(header {header} + data), the file has {len(buf)}")
    data = np.frombuffer(buf, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)  # own, writable, native memory


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or not (told apart by the gzip magic number, not the name)."""
    path = Path(path)
    buf = path.read_bytes()
    if buf[:2] == GZIP_MAGIC:
        try:
            buf = gzip.decompress(buf)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream an EOFError
            raise IDXError(f"{path}: corrupt gzip data ({type(e).__name__}: {e})") from e
    return parse_idx(buf, str(path))
