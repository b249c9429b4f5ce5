"""A same-node fast path for client requests to the S-Server: a Unix socket, authenticated.

A Ray actor call of a 64 KiB upload takes 1.3 – 3.3 ms one way on the 2-core dev machine, and
about 1 ms of the receiver's CPU; the same bytes through a socket take about 0.1 ms. The
alignment rounds of `exact` order are a chain of such messages, so the client actors send their
requests this way when the S-Server is on their node (bench/RESULTS.md, session 8).

The socket carries exactly what `SServer.submit` takes, as length-prefixed pickle frames, and
brings back the answer (or the error) of an answered request. Everything else stays with Ray:
the actors, their placement and restarts, the control calls, and any request whose channel is
missing or broken — a client actor then calls `submit` (Ray raises there if the S-Server is
gone). Requests carry sequence numbers, so mixing the two paths keeps their order.

Authentication. The socket's address is abstract on Linux: file permissions do not protect it,
and /proc/net/unix lists it to every user of the machine. Unpickling a frame runs whatever code
the frame names, so a frame from anyone but the run's own actors is a command executed by the
receiver. Every connection therefore starts with a mutual HMAC-SHA256 challenge–response over a
per-run random key, which the S-Server makes as it opens the channel and hands only to the
run's client actors, in the answer of an (authenticated) Ray call, `SServer.channel`:

    server → client   nonce_s                                       (32 bytes)
    client → server   HMAC(key, "fslsage-client" + nonce_s) + nonce_c  (32 + 32 bytes)
    server → client   HMAC(key, "fslsage-server" + nonce_s + nonce_c)  (32 bytes)

Both ends read only these fixed-size fields before the other has proved it knows the key, and
compare digests in constant time. The server's proof matters too: once the S-Server is gone,
another process may bind the same abstract name and feed pickles to the client actors. A peer
that fails is closed before any frame is read: the S-Server logs one warning naming it (pid, uid
and gid from SO_PEERCRED) and goes on serving; a client raises ChannelBroken and its requests go
as Ray calls. A silent peer is dropped after HANDSHAKE_TIMEOUT_S. After the handshake the frames
are as before, with no per-frame cost: the connection is the authenticated peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import pickle
import secrets
import socket
import struct
import sys
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from actors.ordering import ANSWERED

HEADER = struct.Struct("<Q")  # frame length
log = logging.getLogger(__name__)
BUFFER_BYTES = 4 << 20  # a client's send buffer, where the system allows that much
KEY_BYTES = 32  # the per-run key (as long as the HMAC-SHA256 digest)
NONCE_BYTES = 32
DIGEST_BYTES = hashlib.sha256().digest_size
HANDSHAKE_TIMEOUT_S = 5.0  # a peer that does not finish the handshake by then is dropped
CLIENT, SERVER = b"fslsage-client", b"fslsage-server"  # distinct: no proof is the other's


class ChannelBroken(ConnectionError):
    """The S-Server's end of the channel is gone (it died or was restarted), or the other end
    did not prove it knows the run's key."""


def new_key() -> bytes:
    """A per-run channel key (the S-Server makes one as it opens the channel)."""
    return secrets.token_bytes(KEY_BYTES)


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=5)
    return HEADER.pack(len(body)) + body


def _proof(key: bytes, role: bytes, *nonces: bytes) -> bytes:
    return hmac.new(key, role + b"".join(nonces), hashlib.sha256).digest()


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError("the channel key must be random bytes (at least 16)")


def peer_of(conn: socket.socket) -> str:
    """Who is at the other end of a Unix socket, for the log: pid, uid and gid where the system
    tells (SO_PEERCRED, Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return "an unidentified peer"
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("iII"))
        pid, uid, gid = struct.unpack("iII", creds)  # struct ucred
    except OSError:
        return "an unidentified peer"
    return f"pid {pid} (uid {uid}, gid {gid})"


def serve(
    handle: Callable[..., Awaitable[Any]], loop: asyncio.AbstractEventLoop, key: bytes
) -> str:
    """Listens on a Unix socket; returns its path. A connection is served only once its peer
    has proved it knows `key` (see the module docstring); any other is logged and closed. Each
    frame is `(epoch, cid, seq, kind, args, done)`, handed to `handle` (as `submit` takes it) on
    `loop`, in the order it came; an answered request gets back `(True, answer)` or
    `(False, error)`, sent from the loop as soon as it is answered. A thread per client actor
    reads the frames, also while the loop computes, so a client never waits for the S-Server's
    current step to send (as with Ray calls)."""
    _check_key(key)
    if sys.platform.startswith("linux"):  # an abstract address: nothing left behind on disk
        path = f"\0fslsage-s-server-{uuid.uuid4().hex}"
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="fslsage-s-server-"), "requests.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    async def answer(conn: socket.socket, message: tuple) -> None:
        epoch, cid, seq, kind, args, done = message
        if kind not in ANSWERED:  # fire-and-forget, as a Ray call without get
            try:
                await handle(epoch, cid, seq, kind, *args, done=done)
            except Exception:  # noqa: BLE001 - nobody waits for it
                log.exception("S-Server channel: a %s request failed", kind)
            return
        try:
            reply = (True, await handle(epoch, cid, seq, kind, *args, done=done))
        except Exception as e:  # noqa: BLE001 - raised again in the client
            reply = (False, e)
        try:
            data = frame(reply)
        except Exception as e:  # noqa: BLE001 - an answer or error that does not pickle
            data = frame((False, RuntimeError(repr(e if reply[0] else reply[1]))))
        try:
            conn.sendall(data)  # the client waits in recv for it: no stall
        except OSError:
            pass  # the client actor went away

    def read(conn: socket.socket) -> None:
        try:
            _prove_server(conn, key)
        except (ChannelBroken, OSError) as e:  # OSError: also the handshake's timeout
            # before close: SO_PEERCRED needs the connection
            log.warning("S-Server channel: refused %s: %s", peer_of(conn), e)
            conn.close()
            return
        try:
            while True:
                (size,) = HEADER.unpack(_read(conn, HEADER.size))
                message = pickle.loads(_read(conn, size))
                # Tasks take their first step in the order they were made: requests are filed
                # in the order they came
                asyncio.run_coroutine_threadsafe(answer(conn, message), loop)
        except (ChannelBroken, OSError):
            conn.close()  # the client actor went away; what it sent before is filed

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            # the handshake runs in the connection's thread: a silent peer holds up no other
            threading.Thread(target=read, args=(conn,), daemon=True, name="channel-read").start()

    threading.Thread(target=accept, daemon=True, name="channel-accept").start()
    return path


def _prove_server(conn: socket.socket, key: bytes) -> None:
    """The S-Server's side of the handshake; raises ChannelBroken (or OSError) if the peer does
    not know `key`. Reads fixed-size fields only, unpickles nothing."""
    conn.settimeout(HANDSHAKE_TIMEOUT_S)
    nonce = secrets.token_bytes(NONCE_BYTES)
    conn.sendall(nonce)
    reply = _read(conn, DIGEST_BYTES + NONCE_BYTES)
    proof, client_nonce = reply[:DIGEST_BYTES], reply[DIGEST_BYTES:]
    if not hmac.compare_digest(proof, _proof(key, CLIENT, nonce)):
        raise ChannelBroken("the peer does not know the run's channel key")
    conn.sendall(_proof(key, SERVER, nonce, client_nonce))
    conn.settimeout(None)  # authenticated: blocking frames from here on


def _prove_client(sock: socket.socket, key: bytes) -> None:
    """The client's side of the handshake; raises ChannelBroken (or OSError) if the server
    does not know `key`."""
    nonce = _read(sock, NONCE_BYTES)
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(_proof(key, CLIENT, nonce) + client_nonce)
    proof = _read(sock, DIGEST_BYTES)
    if not hmac.compare_digest(proof, _proof(key, SERVER, nonce, client_nonce)):
        raise ChannelBroken("the server does not know the run's channel key")


def _read(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ChannelBroken("the other end closed the channel")
        buf += chunk
    return bytes(buf)


class ClientChannel:
    """A client actor's end: blocking sends, and a blocking wait for an answer. Connecting runs
    the handshake: ChannelBroken if the server cannot be reached or does not know `key`."""

    def __init__(self, path: str, key: bytes):
        _check_key(key)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
        self.sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            self.sock.connect(path)
            _prove_client(self.sock, key)
        except (ChannelBroken, OSError) as e:
            self.sock.close()
            raise ChannelBroken(f"cannot reach the S-Server at {path!r}: {e}") from e
        self.sock.settimeout(None)  # authenticated: blocking frames from here on

    def request(self, message: tuple, answered: bool) -> Any:
        """Sends `(epoch, cid, seq, kind, args, done)`; returns the answer if `answered` (an
        error of the S-Server is raised here), else None."""
        try:
            self.sock.sendall(frame(message))
            if not answered:
                return None
            (size,) = HEADER.unpack(_read(self.sock, HEADER.size))
            ok, value = pickle.loads(_read(self.sock, size))
        except OSError as e:
            raise ChannelBroken(f"S-Server channel: {e}") from e
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.sock.close()
