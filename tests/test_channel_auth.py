"""The same-node channel (actors/channel.py) serves only peers that know the run's key: its
abstract Unix socket is visible to every process on the machine and its frames are pickles.
And a Ray instance the project starts listens on loopback only."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import pathlib
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pandas as pd
import pytest
from helpers import demo_config
from test_ray_runtime import assert_same_metrics, run_local

from actors import channel as channel_module
from actors.channel import HEADER, ChannelBroken, ClientChannel, new_key, serve
from actors.runtime import RayRuntime
from fslsage.experiment import prepare, run_experiment

LINUX = sys.platform.startswith("linux")


class Evil:
    """Unpickling it creates `marker`: a stand-in for any command a pickle can run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def evil_frame(marker: pathlib.Path) -> bytes:
    """A well-formed channel frame whose unpickling creates `marker`, padded well past the
    handshake's fixed-size fields (so they are read at once, not waited for)."""
    body = pickle.dumps((Evil(marker), b"x" * 256), protocol=5)
    return HEADER.pack(len(body)) + body


def until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes | None:
    """Everything the other end sends until it closes the connection; None if it is still open
    after `timeout` seconds."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return got


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == channel_module.__name__ and r.levelno == logging.WARNING
    ]


@pytest.fixture
def served() -> Iterator[tuple[str, bytes, list[tuple]]]:
    """A channel served on an event loop in a thread, with a `handle` that records its calls:
    (path, key, calls)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    calls: list[tuple] = []

    async def handle(epoch, cid, seq, kind, *args, done=()):
        calls.append((epoch, cid, seq, kind, args, list(done)))
        return ("answer", seq, args)

    key = new_key()
    path = serve(handle, loop, key)
    yield path, key, calls
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


# ------------------------------------------------------------------------------- unit level
def test_a_client_with_the_key_is_served_as_before(served):
    path, key, calls = served
    channel = ClientChannel(path, key)
    try:
        assert channel.request((1, 0, 0, "upload", (b"z", b"y"), []), answered=False) is None
        assert channel.request((1, 0, 1, "align", (), [(0, 2)]), answered=True) == ("answer", 1, ())
    finally:
        channel.close()
    assert calls == [(1, 0, 0, "upload", (b"z", b"y"), []), (1, 0, 1, "align", (), [(0, 2)])]


def test_a_foreign_pickle_is_never_unpickled_and_the_server_goes_on(served, tmp_path, caplog):
    """A process without the key sends a frame as a client would: the S-Server drops the
    connection after the handshake's fixed-size fields, runs nothing, logs the peer, and still
    serves its clients."""
    path, key, calls = served
    marker = tmp_path / "pwned"
    caplog.set_level(logging.WARNING, logger=channel_module.__name__)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as foreign:
        foreign.connect(path)
        foreign.sendall(evil_frame(marker))
        got = until_closed(foreign, timeout=5)
    time.sleep(0.2)  # a frame that was unpickled after all would have run by now
    assert not marker.exists()
    assert calls == []
    assert got is not None and len(got) == channel_module.NONCE_BYTES  # the challenge; closed
    [warning] = refusals(caplog)
    assert "refused" in warning and "channel key" in warning
    if LINUX:  # SO_PEERCRED names the peer: this process
        assert f"pid {os.getpid()} (uid {os.getuid()}, gid {os.getgid()})" in warning
    channel = ClientChannel(path, key)
    try:
        assert channel.request((1, 3, 0, "exchange", (), []), answered=True) == ("answer", 0, ())
    finally:
        channel.close()
    assert calls == [(1, 3, 0, "exchange", (), [])]


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(served, monkeypatch, caplog):
    path, key, calls = served
    monkeypatch.setattr(channel_module, "HANDSHAKE_TIMEOUT_S", 0.3)
    caplog.set_level(logging.WARNING, logger=channel_module.__name__)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(path)
        channel = ClientChannel(path, key)  # served meanwhile: the silent one holds up nothing
        try:
            assert channel.request((1, 0, 0, "align", (), []), answered=True) == ("answer", 0, ())
        finally:
            channel.close()
        assert until_closed(silent, timeout=5) is not None
    [warning] = refusals(caplog)
    assert "timed out" in warning
    assert calls == [(1, 0, 0, "align", (), [])]


def test_a_client_with_a_wrong_key_gets_channel_broken(served, caplog):
    path, _, calls = served
    caplog.set_level(logging.WARNING, logger=channel_module.__name__)
    with pytest.raises(ChannelBroken):
        ClientChannel(path, new_key())
    deadline = time.monotonic() + 5
    while not refusals(caplog) and time.monotonic() < deadline:
        time.sleep(0.01)  # the server logs from its connection's thread
    assert len(refusals(caplog)) == 1
    assert calls == []


@pytest.mark.parametrize("challenge", [True, False], ids=["after-a-challenge", "at-once"])
def test_a_server_without_the_key_cannot_make_a_client_unpickle(tmp_path, challenge):
    """A process that took the channel's address (e.g. once the S-Server died) sends the client
    a pickle: the client never unpickles it, and raises ChannelBroken (it then uses Ray)."""
    marker = tmp_path / "pwned"
    if LINUX:
        path = f"\0fslsage-test-fake-{uuid.uuid4().hex}"
    else:
        path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def fake_server() -> None:
        conn, _ = listener.accept()
        with conn:
            if challenge:  # plays the handshake without the key
                conn.sendall(secrets.token_bytes(channel_module.NONCE_BYTES))
                conn.recv(channel_module.DIGEST_BYTES + channel_module.NONCE_BYTES)
            conn.sendall(evil_frame(marker) * 2)
            until_closed(conn)

    thread = threading.Thread(target=fake_server, daemon=True)
    thread.start()
    try:
        with pytest.raises(ChannelBroken):
            ClientChannel(path, new_key())
    finally:
        thread.join(10)
        listener.close()
    assert not marker.exists()


def test_a_channel_needs_a_real_key():
    with pytest.raises(ValueError):
        ClientChannel("\0unused", b"")


# ---------------------------------------------------------------------------------- with Ray
ATTACKER = """
import pathlib, pickle, socket, struct, sys

class Evil:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(sys.argv[2]),))

name = sys.argv[1]  # the channel's abstract name, as /proc/net/unix lists it
listed = [line.split()[-1] for line in open("/proc/net/unix").read().splitlines()[1:]]
print("listed" if "@" + name in listed else "not listed", flush=True)
body = pickle.dumps((Evil(), b"x" * 256), protocol=5)
for _ in range(3):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect("\\0" + name)
        s.sendall(struct.pack("<Q", len(body)) + body)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            print("still open", flush=True)
            continue
        print("closed after", len(got), flush=True)
"""


@pytest.mark.skipif(not LINUX, reason="the attacker finds the socket in /proc/net/unix")
def test_a_foreign_process_cannot_run_code_in_the_s_server_during_a_ray_run(ray_session, tmp_path):
    """During a real run a foreign process finds the S-Server's channel in /proc/net/unix and
    sends it a malicious pickle: nothing runs, the client actors still use the channel, and
    the run's metrics are the in-process runtime's."""
    ray = ray_session
    cfg = demo_config(algorithm="fsl_sage", rounds=2, server_batching="exact")
    marker = tmp_path / "pwned"
    runtime = RayRuntime(prepare(cfg))
    try:
        _, path, key = ray.get(runtime.server.channel.remote())
        assert path.startswith("\0") and len(key) == channel_module.KEY_BYTES
        attacker = subprocess.Popen(
            [sys.executable, "-c", ATTACKER, path[1:], str(marker)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        run_experiment(cfg, runtime, out_dir=tmp_path / "ray", progress=None)
        out, err = attacker.communicate(timeout=60)
        assert attacker.returncode == 0, err
        used_channel = [
            w["channel"] for w in ray.get([a.where.remote() for a in runtime.client_actors])
        ]
    finally:
        runtime.close()
    assert not marker.exists()
    assert out.splitlines() == ["listed"] + [f"closed after {channel_module.NONCE_BYTES}"] * 3
    assert all(used_channel)  # the run's own clients passed the handshake
    ray_df = pd.read_parquet(tmp_path / "ray" / "metrics.parquet")
    assert_same_metrics(run_local(cfg, tmp_path / "local"), ray_df)


def _listening_inodes() -> dict[int, str]:
    """inode → local address of every listening TCP socket (state 0A) of this machine's network
    namespace, from /proc/net/tcp and tcp6."""
    found = {}
    for name, width in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = pathlib.Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":
                continue
            hex_ip, port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # the kernel prints the address as host-order 32-bit words
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found[inode] = f"{ipaddress.ip_address(raw)}:{int(port, 16)}"
    return found


def _this_process_and_descendants() -> dict[int, str]:
    """pid → command name of this process and every process it started (Ray's GCS, raylet,
    agents and workers)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        names[int(entry.name)] = comm
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        tree[pid] = names.get(pid, "?")
        todo.extend(children.get(pid, []))
    return tree


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_the_local_ray_instance_listens_on_loopback_only(ray_session):
    """Every TCP port that the Ray started for the tests (as the project starts one: GCS,
    raylet, dashboard agent and its metrics export, runtime-env agent, autoscaler, workers)
    listens on a loopback address, none on all interfaces."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def pid() -> int:
        return os.getpid()

    assert ray.get(pid.remote()) != os.getpid()  # a worker is up too
    listening = _listening_inodes()
    ours = []
    for pid_, comm in _this_process_and_descendants().items():
        try:
            fds = list(pathlib.Path(f"/proc/{pid_}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in listening:
                ours.append((comm, listening[int(target[8:-1])]))
    assert any(comm == "gcs_server" for comm, _ in ours)  # found Ray's processes
    exposed = [(comm, address) for comm, address in ours if not _is_loopback(address)]
    assert exposed == []
