"""The binary-matrix files of the NORB datasets (smallNORB's .mat files), gzip-compressed or raw.

Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5 trains on smallNORB,
published as these files. The format, from the smallNORB page
(https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/): little-endian int32 words — a magic number naming
the element type, the number of dimensions `ndim`, then max(ndim, 3) dimensions (the unused ones are
1) — followed by the elements in C order, little-endian. The 430 MB image files are read in chunks
(`MatrixReader.read_rows`), so a caller can place them straight into its own array. Every malformed
case becomes a one-line `DataError`.
"""

import contextlib
import gzip
import math
import struct
import zlib

import numpy as np

from data.idx import DataError

# Element type per magic number (smallNORB page, "file format").
MAGIC_DTYPES = {
    0x1E3D4C51: np.dtype("<f4"),  # single-precision matrix
    0x1E3D4C53: np.dtype("<f8"),  # double-precision matrix
    0x1E3D4C54: np.dtype("<i4"),  # integer matrix
    0x1E3D4C55: np.dtype("u1"),  # byte matrix
    0x1E3D4C56: np.dtype("<i2"),  # short matrix
}
_MAGIC_FOR_DTYPE = {dtype: magic for magic, dtype in MAGIC_DTYPES.items()}
_WORD = struct.Struct("<i")  # Every header word: little-endian int32.
_MIN_DIM_WORDS = 3  # The header always holds at least 3 dimension words (smallNORB page).
_MAX_NDIM = 16  # Far above smallNORB's 4: a larger count means a corrupt header, not a real file.
_GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952, section 2.3.1: bytes ID1, ID2 of every member.
_STREAM_ERRORS = (OSError, EOFError, zlib.error)  # What a damaged gzip stream raises while read.


class MatrixReader:
    """Reads the rows of one open binary-matrix file in order; made by `open_matrix`.

    Attributes:
        path: the file's path, for error messages.
        dtype: element type (a little-endian numpy dtype).
        shape: the declared shape, a tuple of `ndim` ints; rows are along the first axis.
    """

    def __init__(self, path, stream):
        """Reads and checks the header from `stream`, positioned at the file's start."""
        self.path = path
        self._stream = stream
        self._bytes_read = 0
        magic, ndim = self._read_words(2, "header")
        if magic not in MAGIC_DTYPES:
            known = ", ".join(f"0x{m:08X}" for m in sorted(MAGIC_DTYPES))
            raise DataError(
                f"{path}: bad binary-matrix magic number 0x{magic & 0xFFFFFFFF:08X}; expected one of {known}"
            )
        if not 1 <= ndim <= _MAX_NDIM:
            raise DataError(f"{path}: binary-matrix header declares {ndim} dimensions (expected 1..{_MAX_NDIM})")
        dims = self._read_words(max(ndim, _MIN_DIM_WORDS), "header")
        if min(dims) < 0:
            raise DataError(f"{path}: binary-matrix header declares a negative dimension ({list(dims[:ndim])})")
        self.dtype = MAGIC_DTYPES[magic]
        self.shape = tuple(dims[:ndim])
        self._header_bytes = self._bytes_read

    def _read_into(self, buffer, what):
        """Fills the writable byte memoryview `buffer` from the stream; DataError if the file ends first."""
        filled = 0
        while filled < len(buffer):
            got = self._stream.readinto(buffer[filled:])
            if not got:
                break
            filled += got
        self._bytes_read += filled
        if filled < len(buffer):
            if what == "header":
                raise DataError(f"{self.path}: truncated binary-matrix header ({self._bytes_read} bytes)")
            payload = math.prod(self.shape) * self.dtype.itemsize
            raise DataError(
                f"{self.path}: truncated binary-matrix payload (header declares shape "
                f"{list(self.shape)}, {payload} bytes; found {self._bytes_read - self._header_bytes})"
            )

    def _read_words(self, count, what):
        """Reads `count` little-endian int32 header words."""
        words = bytearray(_WORD.size * count)
        self._read_into(memoryview(words), what)
        return tuple(_WORD.unpack_from(words, _WORD.size * i)[0] for i in range(count))

    def read_rows(self, count):
        """Reads the next `count` rows.

        Args:
            count: rows to read, 0..(rows left).

        Returns:
            A new array [count, *shape[1:]] of `dtype`.

        Raises:
            DataError: the file ends before `count` more rows.
        """
        rows = np.empty((count,) + self.shape[1:], self.dtype)
        self._read_into(memoryview(rows).cast("B"), "payload")  # rows' own memory: no extra copy
        return rows

    def check_end(self):
        """Raises DataError if bytes follow the declared payload."""
        if self._stream.read(1):
            raise DataError(
                f"{self.path}: unexpected trailing bytes after the binary-matrix payload of shape {list(self.shape)}"
            )


@contextlib.contextmanager
def open_matrix(path):
    """Opens a binary-matrix file, gzip-compressed or raw (told by its content), and reads its header.

    Args:
        path: file path.

    Yields:
        A `MatrixReader` positioned at the first row.

    Raises:
        DataError: the file is missing or unreadable, its gzip stream is truncated or corrupt (also when
            this happens while rows are read inside the `with` block), or its header is malformed.
    """
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    with raw:
        compressed = raw.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            yield MatrixReader(path, stream)
        except _STREAM_ERRORS as e:
            kind = "truncated or corrupt gzip data" if compressed else "cannot read file"
            raise DataError(f"{path}: {kind} ({e})") from None


def read_matrix(path):
    """Reads a whole binary-matrix file, gzip-compressed or raw.

    Args:
        path: file path.

    Returns:
        Array of the declared shape and element type.

    Raises:
        DataError: as `open_matrix`, or the payload is shorter or longer than the header declares.
    """
    with open_matrix(path) as reader:
        rows = reader.read_rows(reader.shape[0])
        reader.check_end()
    return rows


def write_matrix(path, array):
    """Writes an array as a binary-matrix file, gzip-compressed if `path` ends in .gz.

    Args:
        path: destination path.
        array: array of uint8, int16, int32, float32 or float64 with 1 or more dimensions.

    Raises:
        ValueError: unsupported element type or a 0-d array.
    """
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _MAGIC_FOR_DTYPE or array.ndim < 1:
        raise ValueError(
            f"write_matrix needs a 1-D or larger array of {sorted(map(str, _MAGIC_FOR_DTYPE))}, got "
            f"{array.dtype} of shape {array.shape}"
        )
    dims = array.shape + (1,) * (_MIN_DIM_WORDS - array.ndim)  # unused dimensions are written as 1
    header = b"".join(_WORD.pack(word) for word in (_MAGIC_FOR_DTYPE[dtype], array.ndim) + dims)
    data = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: identical bytes on every run.
    with open(path, "wb") as f:
        f.write(data)
