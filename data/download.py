"""Checksum-verified, atomic download of a dataset's files from a list of mirrors.

Shared by the dataset modules of Section 5 of Hinton, Sabour & Frosst, "Matrix capsules with EM
routing", ICLR 2018: each one passes its own table of file names and SHA-256 digests and its own
mirrors. Every file is written to a temporary file beside its destination, checked against its
SHA-256, and only then moved into place with `os.replace`, so no partial or unverified file is ever
left behind. `ensure_files` accepts files already present, .gz or uncompressed, without checking them.
"""

import hashlib
import http.client
import os
import tempfile
import urllib.request

from data.idx import DataError, find_file

_DOWNLOAD_TIMEOUT_S = 30  # Socket timeout per blocking network operation, seconds.
_COPY_CHUNK_BYTES = 1 << 20  # Read size while hashing and downloading (1 MiB).


def sha256_of(path):
    """Returns the hex SHA-256 digest of a file's bytes (as stored, not decompressed).

    Args:
        path: file path.

    Returns:
        64-character lowercase hex string.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_to(url, out_file, urlopen):
    """Streams `url` into an open binary file and returns the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    with urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        for chunk in iter(lambda: response.read(_COPY_CHUNK_BYTES), b""):
            digest.update(chunk)
            out_file.write(chunk)
    return digest.hexdigest()


def _try_mirror(url, dest, expected_sha256, urlopen):
    """Downloads `url` to a temp file beside `dest`, verifies it, then moves it into place.

    Args:
        url: full URL of the file.
        dest: final path.
        expected_sha256: hex digest the downloaded bytes must have.
        urlopen: `urllib.request.urlopen`-compatible callable.

    Returns:
        None on success, else a one-line reason this mirror failed. The temp file
        never survives a failure.
    """
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".part", dir=os.path.dirname(dest))
    try:
        with os.fdopen(fd, "wb") as out_file:
            try:
                got = _fetch_to(url, out_file, urlopen)
            except (OSError, ValueError, http.client.HTTPException) as e:
                return f"{url}: {e}"
        if got != expected_sha256:
            return f"{url}: SHA-256 mismatch (expected {expected_sha256}, got {got})"
        os.replace(tmp_path, dest)  # Atomic: readers never see a partial file.
        tmp_path = None
        return None
    finally:
        if tmp_path is not None:
            os.remove(tmp_path)


def download_file(name, expected_sha256, data_dir, mirrors, urlopen=None):
    """Downloads one file into `data_dir`, trying `mirrors` in order.

    Args:
        name: file name, appended to each mirror's base URL and used in `data_dir`.
        expected_sha256: hex digest the downloaded bytes must have.
        data_dir: destination directory (created if missing).
        mirrors: base URLs ending in '/'.
        urlopen: `urllib.request.urlopen`-compatible callable (url, timeout=...)
            returning a context manager with `.read(n)`; None uses urllib's.

    Returns:
        Path of the verified file.

    Raises:
        DataError: no mirror delivered bytes with the expected SHA-256.
    """
    urlopen = urlopen or urllib.request.urlopen
    dest = os.path.join(data_dir, name)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create data directory ({e})") from None
    reasons = []
    for mirror in mirrors:
        reason = _try_mirror(mirror + name, dest, expected_sha256, urlopen)
        if reason is None:
            return dest
        reasons.append(reason)
    raise DataError(f"cannot download {name}: " + ("; ".join(reasons) or "no mirrors given"))


def download_missing(files, data_dir, mirrors, urlopen=None):
    """Downloads each file of `files` not already in `data_dir`; files present are left untouched.

    Args:
        files: dict from file name to the hex SHA-256 of its bytes.
        data_dir: destination directory (created if missing).
        mirrors: base URLs ending in '/', tried in order for each file.
        urlopen: as in `download_file`; None uses urllib's.

    Returns:
        Dict from each name of `files` to its path in `data_dir`.

    Raises:
        DataError: a file could not be fetched from any mirror, or its SHA-256
            did not match; no partial or unverified file is left behind.
    """
    paths = {}
    for name, expected_sha256 in files.items():
        path = os.path.join(data_dir, name)
        paths[name] = path if os.path.exists(path) else download_file(name, expected_sha256, data_dir, mirrors, urlopen)
    return paths


def ensure_files(files, data_dir, mirrors, dataset, download=True, urlopen=None):
    """Makes sure every file of `files` is in `data_dir`, .gz or uncompressed, downloading missing ones.

    Files already present (`data.idx.find_file`: the published .gz, else its uncompressed form) are not
    checksum-checked, so users may supply their own copies.

    Args:
        files: dict from published file name (ending in .gz) to the hex SHA-256 of its bytes.
        data_dir: directory holding (or to receive) the files.
        mirrors: base URLs ending in '/', tried in order for each missing file.
        dataset: display name used in error messages, e.g. "MNIST".
        download: fetch missing files if True.
        urlopen: as in `download_file`; None uses urllib's.

    Returns:
        Dict from each name of `files` to the path of the file found or downloaded.

    Raises:
        DataError: a file is missing and `download` is False, or its download failed.
    """
    paths = {}
    for name, expected_sha256 in files.items():
        path = find_file(data_dir, name)
        if path is None:
            if not download:
                raise DataError(
                    f"{os.path.join(data_dir, name)}: {dataset} file not found (nor uncompressed "
                    f"{os.path.splitext(name)[0]}) and download is disabled"
                )
            path = download_file(name, expected_sha256, data_dir, mirrors, urlopen)
        paths[name] = path
    return paths
