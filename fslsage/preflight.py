"""Checks of what a command was given that the config's own validation cannot see — folders,
the Ray address, the MLflow store — made before anything starts. Each failure is a ConfigError
naming what was given, so the CLIs print one line and exit with code 2, having written nothing.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from fslsage.config import ConfigError

CONNECT_TIMEOUT_S = 5.0  # a Ray head or MLflow server that answers at all answers within this


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folder(path: str | Path, key: str) -> Path:
    """`path` resolved, once it is known to be a folder or creatable as one (nothing is
    created): not an existing file, not under a file, in a folder this process may write."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} exists and is not a folder")
    base = _first_existing(path)
    if not base.is_dir():
        raise ConfigError(key, f"{path} cannot be a folder: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{path}: {base} is not writable")
    return path


def create_folder(path: str | Path, key: str) -> list[Path]:
    """`mkdir -p path`, as a ConfigError on `key` when the file system refuses (e.g. under
    /proc). Returns the folders it created, outermost first, so a command that fails before
    writing anything can remove them again (`remove_created`)."""
    path = check_folder(path, key)
    created = []
    probe = path
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_created(created[::-1])
        raise ConfigError(key, f"cannot create {path}: {e.strerror or e}") from None
    return created[::-1]


def remove_created(created: list[Path]) -> None:
    """Removes folders `create_folder` made, innermost first, if they are still empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # something was written there after all: keep it
            return


def check_ray_address(address: str | None, key: str) -> None:
    """A Ray address to join answers on its port within seconds (`ray.init` would otherwise
    retry for minutes, deaf to SIGTERM). "auto", "local" and empty addresses are Ray's own."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(key, f"expected HOST:PORT (or auto), got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConfigError(
            key, f"no Ray cluster answers at {address}: {e.strerror or e or 'timed out'}"
        ) from None


def check_tracking_uri(uri: str, key: str) -> None:
    """The MLflow store can be used: a SQLite file or file store in a folder that is (or can
    be) one, a tracking server that answers HTTP within seconds (MLflow's client would retry
    for minutes, after Ray has started)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if db.exists() and not db.is_file():
            raise ConfigError(key, f"{db} is not a SQLite file")
        check_folder(db.parent, key)
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            return  # it answered: a server is there (its own errors are MLflow's to report)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ConfigError(key, f"cannot reach the MLflow server at {uri}: {reason}") from None
    elif uri.startswith("file://") or "://" not in uri and not uri.startswith("databricks"):
        check_folder(uri.removeprefix("file://"), key)
