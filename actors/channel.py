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
import os
import pickle
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

ANSWERED = ("exchange", "align")  # request kinds the client waits on; uploads are fire-and-forget
HEADER = struct.Struct("<Q")  # frame length
BUFFER_BYTES = 4 << 20  # socket buffers: uploads never wait for the S-Server's current step


class ChannelBroken(ConnectionError):
    """The S-Server's end of the channel is gone (it died or was restarted)."""


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=5)
    return HEADER.pack(len(body)) + body


async def serve(handle: Callable[..., Awaitable[Any]]) -> str:
    """Starts a Unix-socket server on the running event loop; returns its path. Each frame is
    `(epoch, cid, seq, kind, args, done)`, passed to `handle` as `submit` takes it; an answered
    request gets back `(True, answer)` or `(False, error)`."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                epoch, cid, seq, kind, args, done = pickle.loads(await reader.readexactly(size))
                if kind not in ANSWERED:
                    await handle(epoch, cid, seq, kind, *args, done=done)
                    continue
                try:  # the client waits for this answer, so nothing else comes meanwhile
                    reply = (True, await handle(epoch, cid, seq, kind, *args, done=done))
                except Exception as e:  # noqa: BLE001 - raised again in the client
                    reply = (False, e)
                try:
                    data = frame(reply)
                except Exception as e:  # noqa: BLE001 - an answer or error that does not pickle
                    failure = e if reply[0] else reply[1]
                    data = frame((False, RuntimeError(repr(failure))))
                writer.write(data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client actor went away; what it sent before is filed
        finally:
            writer.close()

    path = os.path.join(tempfile.mkdtemp(prefix="fslsage-s-server-"), "requests.sock")
    await asyncio.start_unix_server(connection, path, limit=BUFFER_BYTES)
    return path


class ClientChannel:
    """A client actor's end: blocking sends, and a blocking wait for an answer."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise ChannelBroken(f"cannot reach the S-Server at {path}: {e}") from e

    def request(self, message: tuple, answered: bool) -> Any:
        """Sends `(epoch, cid, seq, kind, args, done)`; returns the answer if `answered` (an
        error of the S-Server is raised here), else None."""
        try:
            self.sock.sendall(frame(message))
            if not answered:
                return None
            (size,) = HEADER.unpack(self._read(HEADER.size))
            ok, value = pickle.loads(self._read(size))
        except OSError as e:
            raise ChannelBroken(f"S-Server channel: {e}") from e
        if not ok:
            raise value
        return value

    def _read(self, size: int) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise ChannelBroken("the S-Server closed the channel")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()
