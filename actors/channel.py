"""A same-node fast path for client requests to the S-Server: a Unix socket.

A Ray actor call of a 64 KiB upload takes 1.3 – 3.3 ms one way on the 2-core dev machine, and
about 1 ms of the receiver's CPU; the same bytes through a socket take about 0.1 ms. The
alignment rounds of `exact` order are a chain of such messages, so the client actors send their
requests this way when the S-Server is on their node (bench/RESULTS.md, session 8).

The socket carries exactly what `SServer.submit` takes, as length-prefixed pickle frames, and
brings back the answer (or the error) of an answered request. Everything else stays with Ray:
the actors, their placement and restarts, the control calls, and any request whose channel is
missing or broken — a client actor then calls `submit` (Ray raises there if the S-Server is
gone). Requests carry sequence numbers, so mixing the two paths keeps their order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
import sys
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

ANSWERED = ("exchange", "align")  # request kinds the client waits on; uploads are fire-and-forget
HEADER = struct.Struct("<Q")  # frame length
log = logging.getLogger(__name__)
BUFFER_BYTES = 4 << 20  # a client's send buffer, where the system allows that much


class ChannelBroken(ConnectionError):
    """The S-Server's end of the channel is gone (it died or was restarted)."""


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=5)
    return HEADER.pack(len(body)) + body


def serve(handle: Callable[..., Awaitable[Any]], loop: asyncio.AbstractEventLoop) -> str:
    """Listens on a Unix socket; returns its path. Each frame is `(epoch, cid, seq, kind, args,
    done)`, handed to `handle` (as `submit` takes it) on `loop`, in the order it came; an
    answered request gets back `(True, answer)` or `(False, error)`, sent from the loop as soon
    as it is answered. A thread per client actor reads the frames, also while the loop computes,
    so a client never waits for the S-Server's current step to send (as with Ray calls)."""
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
            threading.Thread(target=read, args=(conn,), daemon=True, name="channel-read").start()

    threading.Thread(target=accept, daemon=True, name="channel-accept").start()
    return path


def _read(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ChannelBroken("the other end closed the channel")
        buf += chunk
    return bytes(buf)


class ClientChannel:
    """A client actor's end: blocking sends, and a blocking wait for an answer."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise ChannelBroken(f"cannot reach the S-Server at {path!r}: {e}") from e

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
