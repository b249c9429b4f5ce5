"""Client actors: each owns a fixed set of virtual clients (cid % num_actors) and keeps their
modules, optimizers, RNGs and data shards between rounds, so 100 clients run on 4 actors.

An actor runs its clients one after another with the same executor as the in-process runtime
(`fslsage.transport.run_client_round`); only the `send` callable differs: requests go to the
S-Server actor, uploads without waiting for them — through the same-node channel
(`actors.channel`) when the S-Server runs on this node, else as Ray calls. The channel is
authenticated both ways with the key the S-Server hands out with its address (`SServer.channel`,
a Ray call): its socket is visible to every process on the machine, and frames are pickles.
For gas an actor plays its clients' schedule events instead, each client in a thread of its
own."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.channel import ChannelBroken, ClientChannel
from actors.common import (
    DataBundle,
    assigned_resources,
    dumps,
    loads,
    pack,
    set_up_actor,
    unpack,
)
from actors.ordering import ANSWERED
from fslsage.algorithms.base import Algorithm, ClientReport, State
from fslsage.checkpoint import rng_state, set_rng_state
from fslsage.data import BatchStream
from fslsage.ledger import Ledger
from fslsage.memory import peak_gpu_mib
from fslsage.precision import autocast
from fslsage.transport import RecordingLink, Send, run_client_round


def owned_clients(num_clients: int, num_actors: int) -> list[list[int]]:
    """Round-robin assignment: actor a owns the clients with cid % num_actors == a."""
    return [list(range(a, num_clients, num_actors)) for a in range(num_actors)]


class ClientActor:
    """A pool member: its clients' state lives here between rounds, their shards sliced once
    from the shared dataset; `num_gpus` is its (fractional) share of a card."""

    def __init__(
        self,
        algo: Algorithm,
        data: DataBundle,
        cids: list[int],
        server: Any,
        gpu_fraction: float = 0.0,
        channel: bool = True,
    ):
        self.algo, self.server = algo, server
        self.device = set_up_actor(algo.cfg, gpu_fraction, f"client actor of clients {cids}")
        self.shards = {cid: data.shard(cid, self.device) for cid in cids}
        self.clients = {
            cid: algo.new_client(cid, len(shard), self.device) for cid, shard in self.shards.items()
        }
        self.held_done: list[tuple[int, int]] = []  # (cid, seq) of "done" markers not sent yet
        self.channel_path: str | None = None  # the same-node channel, if the S-Server offers one
        self.channel_key: bytes | None = None  # and the key its handshake proves both ends know
        self.connections = threading.local()  # each thread's connection to it
        self.channel_known = not channel  # asked the S-Server for it (once, or after a break)
        self.pool: ThreadPoolExecutor | None = None  # gas: a thread per client
        self.stateless = algo.cfg.server_mode == "stateless"
        self.replicas: list[Any] = []  # stateless: where exchanges go (asked every round)
        self.streams: dict[int, BatchStream] = {}  # gas: each client's endless minibatches
        if algo.asynchronous:
            self._open_streams()

    def _open_streams(self, positions: dict[int, Any] | None = None) -> None:
        """gas: a minibatch stream per client, drawing from the client's own generator; at
        `positions` when restored from a checkpoint."""
        batch = self.algo.cfg.batch_size
        for cid, client in self.clients.items():
            self.streams[cid] = BatchStream(self.shards[cid], batch, client.generator)
            if positions is not None:
                self.streams[cid].seek(positions[cid])

    def run_round(
        self, t: int, epoch: int, weights: dict[str, State], cids: list[int]
    ) -> tuple[Any, ...]:
        """Round t for `cids`, in order, all starting from `weights`. Returns 1 + len(cids)
        values (call with num_returns=1 + len(cids)): the summary (the reports without weights,
        and this actor's peak GPU memory in the call, `peak_gpu_mib`: None off CUDA), then each
        client's weights as its own object, so the aggregation task (or, in a relay, the
        next stage's clients) reads them from the object store, not via the driver."""
        reports: list[ClientReport] = []
        states: list[dict[str, State]] = []
        self._prepare_round()
        for cid in cids:
            report = self._run_client(t, epoch, weights, cid)
            if cid == cids[-1]:  # no next client to carry its marker: it goes now
                self._flush(epoch)
            states.append(_cpu(report.weights))
            report.weights = {}
            reports.append(report)
        return ({"reports": reports, "peak_gpu_mib": peak_gpu_mib(self.device)}, *states)

    def _run_client(self, t: int, epoch: int, weights: dict[str, State], cid: int) -> ClientReport:
        """Client cid's round t (one unit of work: tests/crashes.py fails an actor here)."""
        send, finish = self._link(epoch, cid)
        report = run_client_round(self.algo, self.clients[cid], self.shards[cid], t, weights, send)
        finish()
        return report

    def run_global_iteration(
        self, t: int, epoch: int, weights: dict[str, State], events: list[tuple[int, str, int]]
    ) -> tuple[Any, ...]:
        """gas: global iteration t's schedule events of this actor's clients, (event index,
        kind, client id) in schedule order (`GAS.on_event`); the S-Server answers the steps in
        the whole schedule's order. Each client plays its own events in a thread of its own, so
        while one waits for its answer the next client's forward pass already runs and its
        request waits at the S-Server for its turn (a client draws its random numbers from its
        own generator and shares no module with another, so the threads change no result).
        Returns 1 + (number of "finish" events) values: the summary (each step's (event index,
        loss), the ledger, the finished clients' reports without weights, in schedule order, and
        `peak_gpu_mib` as `run_round`'s), then each finished client's weights as its own
        object."""
        self._prepare_round()
        own: dict[int, list[tuple[int, str]]] = {}  # each client's events, in order
        for index, kind, cid in events:
            own.setdefault(cid, []).append((index, kind))
        if self.pool is None:  # a thread per owned client: none waits for a free one
            self.pool = ThreadPoolExecutor(len(self.clients), thread_name_prefix="client")
        played = [self.pool.submit(self._play, t, epoch, weights, cid, client_events)
                  for cid, client_events in own.items()]  # fmt: skip
        done, _ = wait(played, return_when=FIRST_EXCEPTION)
        for future in done:  # a failure is raised now: the others wait for turns it would take
            future.result()
        results = [future.result() for future in played]
        ledger = Ledger()
        for _, client_ledger in results:
            ledger.merge(client_ledger)
        outcomes = sorted(out for client_outcomes, _ in results for out in client_outcomes)
        losses = [(index, out) for index, out in outcomes if isinstance(out, float)]
        reports = [out for _, out in outcomes if isinstance(out, ClientReport)]
        states = [_cpu(report.weights) for report in reports]
        for report in reports:
            report.weights = {}
        summary = {"losses": losses, "ledger": ledger.entries(), "reports": reports,
                   "peak_gpu_mib": peak_gpu_mib(self.device)}  # fmt: skip
        return (summary, *states) if states else summary  # one return value goes as it is

    def _play(
        self,
        t: int,
        epoch: int,
        weights: dict[str, State],
        cid: int,
        events: list[tuple[int, str]],
    ) -> tuple[list[tuple[int, float | ClientReport]], Ledger]:
        """Client cid's events of a global iteration, in order. Returns (event index, step loss
        or finished report) of those that give one, and the client's ledger. Its last request
        carries its "done" marker. (One unit of work: tests/crashes.py fails an actor here.)"""
        # taken once: a thread of an abandoned call that is still finishing its event never
        # touches the client or stream a restore (`load_state`) puts in their place
        client, stream = self.clients[cid], self.streams.get(cid)
        ledger = Ledger()
        steps = sum(kind == "step" for _, kind in events)
        link = RecordingLink(cid, t, ledger, self._link(epoch, cid)[0], expected=steps)
        outcomes: list[tuple[int, float | ClientReport]] = []
        for index, kind in events:
            with autocast(self.algo.cfg, self.device):  # per thread, as autocast's state is
                out = self.algo.on_event(t, kind, client, stream, weights, link, ledger)
            if out is not None:
                outcomes.append((index, out if isinstance(out, ClientReport) else float(out)))
        link.close()
        return outcomes, ledger

    def _prepare_round(self) -> None:
        """The same-node channel (asked once, or after it broke) and, stateless, the replicas
        (they come and go: the current ones)."""
        if not self.channel_known:
            self._open_channel()
        if self.stateless:
            self.replicas = ray.get(self.server.replicas.remote())

    def _link(self, epoch: int, cid: int) -> tuple[Send, Callable[[], None]]:
        """`send` for one client's round: numbered S-Server calls (Ray does not keep the order of
        calls to an async actor); uploads go without waiting. The round's "done" marker rides
        with the client's last request when the transport knows it (`last`): the S-Server turns
        to the next client while this one still finishes its round. Otherwise `finish` says the
        round is done: the marker rides with this actor's next call (its next client's first
        request, at most a forward pass later) or goes at once after the actor's last client —
        one call fewer per client either way.
        (Holding uploads back the same way delays the S-Server's work, and two activation
        batches in one call outgrow Ray's inline messages: no faster, so they go at once.)"""
        seq = itertools.count()
        marked = False

        def send(method: str, cid_: int, *args: Any, last: bool = False) -> Any:
            nonlocal marked
            done, self.held_done = self.held_done, []
            n = next(seq)
            if last:
                done.append((cid, next(seq)))
                marked = True
            answer = self._submit(epoch, cid_, n, method, pack(args), done)
            return None if method == "upload" else unpack(answer, self.device)

        def finish() -> None:
            if not marked:
                self.held_done.append((cid, next(seq)))

        return send, finish

    def _flush(self, epoch: int) -> None:
        """Sends the "done" markers still held (the last client's, with those of clients
        before it that sent nothing)."""
        if self.held_done:
            (cid, seq), *rest = self.held_done  # their order does not matter: each has its seq
            self._submit(epoch, cid, seq, "done", (), rest)
            self.held_done = []

    def _submit(self, epoch: int, cid: int, seq: int, kind: str, args: tuple, done: list) -> Any:
        """One request to the S-Server (`SServer.submit`); returns the answer of an answered
        kind. Through the channel if there is one; if it broke (the S-Server died or was
        restarted), as a Ray call, which raises if the S-Server is gone and reaches it if Ray
        has restarted it."""
        if kind == "exchange" and self.stateless:
            answer = self._ask_replica(epoch, cid, seq, args)
            if done:  # the markers that rode along still go to the S-Server
                (done_cid, done_seq), *rest = done
                self._submit(epoch, done_cid, done_seq, "done", (), rest)
            return answer
        answered = kind in ANSWERED
        channel = self._channel()
        if channel is not None:
            try:
                return channel.request((epoch, cid, seq, kind, args, done), answered)
            except ChannelBroken:
                channel.close()
                self.connections.current = None
                self.channel_path, self.channel_known = None, False  # asked again next round
                self.channel_key = None
        ref = self.server.submit.remote(epoch, cid, seq, kind, *args, done=done)
        return ray.get(ref) if answered else None

    def _ask_replica(self, epoch: int, cid: int, seq: int, args: tuple) -> Any:
        """An exchange, answered by a stateless replica: the client's own one (cid-spread), or,
        if that one is dead or restarting, the next that answers."""
        if not self.replicas:
            raise RuntimeError("server_mode stateless, but no S-Server replica is registered")
        error: Exception | None = None
        for k in range(len(self.replicas)):
            replica = self.replicas[(cid + k) % len(self.replicas)]
            try:
                return ray.get(replica.exchange.remote(epoch, cid, seq, *args))
            except (RayActorError, ActorUnavailableError) as e:
                error = e
        raise RuntimeError(f"no S-Server replica answered client {cid}'s request") from error

    def _open_channel(self) -> None:
        node, path, key = ray.get(self.server.channel.remote())
        self.channel_known = True
        same_node = path is not None and node == ray.get_runtime_context().get_node_id()
        self.channel_path, self.channel_key = (path, key) if same_node else (None, None)
        self._channel()  # this thread's connection, at once

    def _channel(self) -> ClientChannel | None:
        """This thread's connection to the same-node channel, or None. A connection carries the
        answers of its own requests, in the order the S-Server gives them, so each client thread
        of a gas iteration has its own; one to an older address (a restarted S-Server) is
        replaced. A server that fails the handshake (not the S-Server: e.g. a process that took
        a dead S-Server's address) counts as broken: Ray calls."""
        if self.channel_path is None or self.channel_key is None:
            return None
        current = getattr(self.connections, "current", None)
        if current is not None and current[0] == self.channel_path:
            return current[1]
        if current is not None:
            current[1].close()
        try:
            channel = ClientChannel(self.channel_path, self.channel_key)
        except ChannelBroken:  # e.g. the S-Server restarted since it answered: Ray calls
            self.connections.current = None
            self.channel_path = self.channel_key = None
            return None
        self.connections.current = (self.channel_path, channel)
        return channel

    def state(self) -> bytes:
        """Every owned client (modules, optimizer state, RNG, and for gas where its minibatch
        stream stands) for a checkpoint."""
        return dumps(self._state())

    def load_state(self, blob: bytes) -> None:
        state = loads(blob, self._state(), self.device)
        self.clients = state["clients"]
        set_rng_state(state["rng"])  # dropout draws from the process's generator
        if self.streams:  # they draw from the restored clients' generators
            self._open_streams(state["positions"])

    def _state(self) -> dict[str, Any]:
        positions = {cid: stream.position() for cid, stream in self.streams.items()}
        return {"clients": self.clients, "rng": rng_state(), "positions": positions}

    def where(self) -> dict[str, Any]:
        """`assigned_resources()`, and whether requests go through the same-node channel."""
        return {**assigned_resources(), "channel": self.channel_path is not None}


def _cpu(weights: dict[str, State]) -> dict[str, State]:
    """Weights leave the actor as CPU tensors: every process sees its own GPU as cuda:0."""
    return {part: {k: v.cpu() for k, v in state.items()} for part, state in weights.items()}
