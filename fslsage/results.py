"""Result files, always written atomically (temp file in the same folder, then rename)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path) then rename onto `path`, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_parquet_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    return write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_csv_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def write_partition_csv(histogram, folder: str | Path) -> Path:
    """FOLDER/partition.csv: a row per client, `client` then its sample count per label."""
    hist = pd.DataFrame(histogram).rename_axis("client").reset_index()
    return write_csv_atomic(hist, Path(folder) / "partition.csv")
