"""Checks of what a command was given that the config's own validation cannot see — folders,
the Ray address, the MLflow store — made before anything starts. Each failure is a ConfigError
naming what was given, so the CLIs print one line and exit with code 2, having written nothing.
"""

from __future__ import annotations

import os
import socket
import stat
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


def check_private(folder: Path, key: str, uid: int | None = None) -> None:
    """`folder` and the files directly in it are this user's (`uid`) and writable by no one
    else, none of them a link: Tune's restore unpickles what lies there (tuner.pkl, the
    trials in its experiment state), so a file another user could have written must not be
    read. Group-writable is fine in this user's own private group. Elsewhere than POSIX,
    nothing is checked."""
    if not hasattr(os, "getuid"):
        return
    uid = os.getuid() if uid is None else uid
    for path in [folder, *sorted(folder.iterdir())]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise ConfigError(key, f"{path} is a link; refusing to read the sweep's state there")
        if path != folder and not stat.S_ISREG(info.st_mode):
            continue  # a trial's folder: the trainable reads its checkpoints as plain data
        if info.st_uid != uid:
            raise ConfigError(key, f"{path} belongs to another user (uid {info.st_uid}); "
                                   "refusing to unpickle the sweep's state from it")  # fmt: skip
        if info.st_mode & stat.S_IWOTH or info.st_mode & stat.S_IWGRP and shared(info.st_gid):
            raise ConfigError(key, f"{path} is writable by other users "
                                   f"({stat.filemode(info.st_mode)}); refusing to unpickle the "
                                   f"sweep's state from it (chmod go-w to resume)")  # fmt: skip


def shared(gid: int) -> bool:
    """Whether group `gid` may hold another user: any group but this user's own private one
    (its primary group, with no members listed; umask 002 makes files writable by it)."""
    import grp

    if gid != os.getgid():
        return True
    try:
        return bool(grp.getgrgid(gid).gr_mem)
    except KeyError:  # a group with no entry: no one is listed in it
        return False


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
