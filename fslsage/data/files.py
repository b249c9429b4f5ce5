"""Shared file handling for the loaders: one clear error for a missing file (naming the path and
the expected layout), an optional download attempt with a short timeout, and safe readers."""

from __future__ import annotations

import gzip
import io
import pickle
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fslsage.data.base import DataError

DOWNLOAD_TIMEOUT_S = 15.0


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's download helpers use urllib without a timeout; bound every socket op."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def ensure_present(
    dataset: str,
    missing: Callable[[], Path | None],
    layout: str,
    download: bool,
    fetch: Callable[[], None] | None = None,
) -> None:
    """Raise one DataError naming the first missing file, after trying `fetch` if allowed.

    `missing()` returns the first missing path (or None when everything is there); `layout`
    describes what should be under the data directory.
    """
    path = missing()
    if path is None:
        return
    if fetch is None:
        raise DataError(
            f"{dataset}: missing {path}; expected {layout} (no automatic download: "
            "place the files there by hand)"
        )
    if not download:
        raise DataError(
            f"{dataset}: missing {path}; expected {layout} (download=true fetches them)"
        )
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fetch()
    except Exception as exc:  # no network, HTTP error, checksum mismatch, ...
        raise DataError(
            f"{dataset}: missing {path}; expected {layout}; the download failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    path = missing()
    if path is not None:
        raise DataError(f"{dataset}: missing {path} after download; expected {layout}")


def plain_or_gz(path: Path) -> Path | None:
    """The file itself, else its `.gz` twin, else None."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped when it ends in .gz; errors name the path."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Dataset pickles hold dicts of numpy arrays; refuse anything else (no code execution)."""

    _ALLOWED = {
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles written by numpy < 2
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    """A python-2-era dataset pickle (bytes keys); truncated or foreign files raise DataError."""
    data = read_bytes(path)
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... all mean "corrupt"
        raise DataError(f"corrupt pickle {path}: {type(exc).__name__}: {exc}") from exc
