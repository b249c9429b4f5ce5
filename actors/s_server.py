"""The S-Server as one asyncio Ray actor (SPEC §7): a thin shell around the pieces that work.

Every request — a client's upload, exchange, alignment job or "round done" marker, a replica's
gradient record — and every control call of the F-Server goes into one `asyncio.Queue`, drained
by one worker coroutine, the only code that touches the server role. Client requests come as
Ray calls of `submit` or, from client actors on this node, through the same-node channel
(`channel`, actors.channel). Which request is served next is `actors.ordering.RoundOrder`'s
call (`exact` order, sequence numbers, round attempts; the F-Server never waits for
`begin_round`). The opening of a round snapshots the server to evaluate the previous round's
global model on (`Evaluations`), a test batch at a time whenever no request is ready: off the
round's critical path (a request waits at most one `eval_batch_size` batch). With
`server_mode: stateless` this actor is the reducer: `actors.replica.Publisher` sends its
weights to the replicas.

``coalesce`` batching: up to `max_batch` ready requests of the same kind that arrive within
`max_wait_ms` are concatenated into one forward/backward and ONE optimizer step; each client
gets back the gradient of its own mean loss, all at the pre-step weights. A documented semantic
change: fewer, larger server steps (measured in bench/server_batching.py). Only the kinds the
server has a batched handler for are coalesced (`Server.batch_handler`: today the shared-model
exchanges of sl and splitfed_v2, the uploads of cse_fsl and fsl_sage); everything else still
runs one request at a time. ``exact`` serves one request at a time, in the in-process
runtime's order: metrics identical to it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.channel import new_key, serve
from actors.common import (
    DataBundle,
    assigned_resources,
    dumps,
    loads,
    pack,
    set_up_actor,
    unpack,
)
from actors.ordering import ANSWERED, CLIENT_KINDS, Request, RoundOrder, settle
from actors.replica import Publisher
from fslsage.algorithms.base import Algorithm, Server, State
from fslsage.checkpoint import rng_state, set_rng_state
from fslsage.experiment import evaluate, evaluation_steps, phase_printer
from fslsage.memory import peak_gpu_columns, peak_gpu_mib
from fslsage.precision import autocast
from fslsage.progress import Throttled, phases_reported_to

log = logging.getLogger(__name__)


@dataclass
class Control:
    """An F-Server call, run by the worker in queue order with the requests."""

    action: Callable[[], Awaitable[Any]]
    future: asyncio.Future

    async def run(self) -> None:
        try:
            result = await self.action()
        except Exception as e:  # noqa: BLE001 - handed to the caller
            settle(self.future, error=e)
        else:
            settle(self.future, result)


class Evaluations:
    """Evaluations of global weights with the server's half as it was when each began, run a
    test batch at a time while the actor has nothing else to do."""

    def __init__(self, algo: Algorithm, data: DataBundle, device: torch.device):
        self.algo, self.cfg, self.device, self.info = algo, algo.cfg, device, data.info
        # on the evaluating device once, as stored (uint8 images): no copy per evaluation
        self.test_x, self.test_y = (t.to(device) for t in data.test_set())
        self.pending: deque[tuple[Generator, asyncio.Future]] = deque()

    def now(self, weights: dict[str, State], server: Server | None) -> tuple[float, float]:
        return evaluate(self._model(weights, server), self.test_x, self.test_y, self.info,
                        self.cfg.eval_batch_size, self.device)  # fmt: skip

    def begin(self, weights: dict[str, State], server: Server | None) -> asyncio.Future:
        """A future for the evaluation of `weights` with `server` as it is now (computed by
        `step`s); an error in it is the future's."""
        future = asyncio.get_running_loop().create_future()
        try:
            model = self._model(weights, server, snapshot=True)
        except Exception as e:  # noqa: BLE001 - the round still opens; begin's caller sees it
            future.set_exception(e)
            return future
        steps = evaluation_steps(model, self.test_x, self.test_y, self.info,
                                 self.cfg.eval_batch_size, self.device)  # fmt: skip
        self.pending.append((steps, future))
        return future

    def step(self) -> None:
        """One test batch of the oldest pending evaluation (its result, after the last)."""
        steps, future = self.pending[0]
        try:
            with autocast(self.cfg, self.device):
                next(steps)
        except StopIteration as finished:
            self.pending.popleft()
            settle(future, finished.value)
        except Exception as e:  # noqa: BLE001 - handed to begin_round's caller
            self.pending.popleft()
            settle(future, error=e)

    def _model(
        self, weights: dict[str, State], server: Server | None, snapshot: bool = False
    ) -> torch.nn.Module:
        """`weights` ∘ the server's model, or ∘ a copy of it as it is now (a snapshot: the
        round goes on training it; the frozen weights of a LoRA model are shared, not copied)."""
        server_model = server.eval_model() if server is not None else None
        if snapshot and server_model is not None:
            frozen = {id(p): p for p in server_model.parameters() if not p.requires_grad}
            server_model = copy.deepcopy(server_model, frozen)
        return self.algo.eval_module(weights, server_model, self.device)


class SServer:
    """Wraps the algorithm's S-Server role (`algo.new_server`); also evaluates the global model,
    since it holds the server half of it."""

    def __init__(
        self,
        algo: Algorithm,
        data: DataBundle,
        batching: str = "exact",
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        gpu_fraction: float = 0.0,
    ):
        self.order = RoundOrder(batching)  # first: a bad `batching` fails before any work
        self.algo, self.cfg = algo, algo.cfg
        self.device = set_up_actor(self.cfg, gpu_fraction, "S-Server")
        self.server = algo.new_server(self.device)
        if self.server is not None:  # shared once (gas's logit adjustment)
            self.server.set_label_counts(data.label_counts)
        self.evaluations = Evaluations(algo, data, self.device)
        self.publisher = Publisher()  # server_mode stateless: the replicas
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[Request | Control] | None = None
        self.worker: asyncio.Task | None = None
        self.getter: asyncio.Task | None = None
        self.batch_sizes: Counter[int] = Counter()
        self.phases: Throttled | None = None  # where a long phase of the open round stands
        self.channel_path: str | None = None
        self.channel_key: bytes | None = None  # proves a peer of the channel is this run's

    # -- the actor's methods -------------------------------------------------------------------
    async def submit(
        self, epoch: int, cid: int, seq: int, kind: str, *args: Any,
        done: list[tuple[int, int]] = (),
    ) -> Any:  # fmt: skip
        """A client request; answers exchange/align, returns at once for upload/done. `done`:
        (client id, sequence number) of "round done" markers riding along with it — a client
        actor holds a finished client's marker until its next message, one call fewer."""
        if kind not in CLIENT_KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        for done_cid, done_seq in done:
            self._put(Request("done", done_cid, done_seq, epoch))
        req = Request(kind, cid, seq, epoch, args)
        if kind in ANSWERED:
            return await self._ask(req)
        self._put(req)
        return None

    async def begin_round(
        self,
        t: int,
        epoch: int,
        cids: list[int],
        after: int = 0,
        previous_global: dict[str, State] | None = None,
        handover: dict[str, State] | None = None,
        turns: list[int] | None = None,
        phase_every_s: float | None = None,
    ) -> tuple[float, float] | None:
        """Opens round attempt `epoch`, which starts from the state attempt `after` ended with
        (0: the initial state, or a checkpoint's); `cids` is the order `exact` serves clients
        in. Given the global weights the previous round produced, evaluates them with the server
        as that round left it — the point the in-process runtime evaluates at — and returns
        their (test loss, accuracy): the F-Server reads it while this round runs. The opening
        snapshots the server for that and goes on at once; the evaluation fills the time this
        actor waits for requests. A server that does not hold that state (restarted) fails the
        attempt with StateLost. `handover`: the global weights the role starts from
        (`Server.start_from`, after a warm start). `turns`: for an asynchronous algorithm (gas),
        the client of each request in the order `exact` serves them (one request a turn).
        `phase_every_s`: the driver prints its progress and hears of a long phase (an
        alignment) at most this often; this actor prints those lines, which Ray forwards to the
        driver's output."""
        evaluation = await self._control(self._open, t, epoch, list(cids), after, previous_global,
                                         handover, turns, phase_every_s)  # fmt: skip
        return None if evaluation is None else await evaluation

    async def end_round(self, t: int, epoch: int) -> dict[str, float]:
        """Answers once every client of round attempt `epoch` is done: the round's server
        metrics."""
        return await self._ask(Request("end", epoch=epoch, args=(t,)))

    async def evaluate(self, weights: dict[str, State]) -> tuple[float, float]:
        return await self._control(self._compute, self._evaluate, weights)

    async def state(self) -> bytes:
        return await self._control(self._compute, self._state)

    async def load_state(self, blob: bytes, after: int) -> None:
        """Restores a checkpoint taken once round attempt `after` had ended; aborts the open
        round (its waiting clients get `actors.ordering.RoundAborted`)."""
        await self._control(self._load, blob, after)

    async def stats(self) -> dict[str, Any]:
        """How many batches of each size were processed (the batching benchmark and tests)."""
        return {"batch_sizes": dict(self.batch_sizes)}

    async def where(self) -> dict[str, Any]:
        return assigned_resources()

    async def channel(self) -> tuple[str, str | None, bytes | None]:
        """(node id, socket path, key) of the same-node fast path for `submit` (actors.channel),
        opened on the first call with a fresh random key: a connection is served only once its
        peer has proved it knows the key, which leaves this actor only in this (Ray's
        authenticated) answer. No path or key where this platform has no Unix sockets."""
        if self.channel_path is None:
            key = new_key()
            try:
                self.channel_path = serve(self.submit, asyncio.get_running_loop(), key)
                self.channel_key = key
            except (OSError, AttributeError) as e:  # AttributeError: no socket.AF_UNIX
                log.warning("no same-node channel, requests go as Ray calls: %r", e)
        return ray.get_runtime_context().get_node_id(), self.channel_path, self.channel_key

    # -- stateless mode: this actor is the reducer ---------------------------------------------
    async def published(self) -> tuple[int, State]:
        """(publication number, weights) a replica answers with."""
        return self.publisher.current(self.server)

    async def register_replica(self, replica: Any) -> None:
        await self.publisher.register(replica, self.server)

    async def replicas(self) -> list[Any]:
        return list(self.publisher.replicas)

    # -- control calls, run by the worker ------------------------------------------------------
    async def _open(
        self,
        t: int,
        epoch: int,
        cids: list[int],
        after: int,
        previous_global: dict[str, State] | None,
        handover: dict[str, State] | None,
        turns: list[int] | None,
        phase_every_s: float | None,
    ) -> asyncio.Future | None:
        self.order.open(epoch, after, cids, turns)  # files nothing the server has served yet
        evaluation = None  # snapshotted before anything of this round touches the server
        if previous_global is not None:
            evaluation = self.evaluations.begin(previous_global, self.server)
        if handover is not None:  # the warm start's aggregate, as round 1 opens
            self.server.start_from(handover)
        if self.server is not None:
            self.server.begin_round(t)
        self.phases = None  # the driver hears of no phase
        if phase_every_s is not None:
            printer = phase_printer(self.cfg, t, functools.partial(print, flush=True))
            self.phases = Throttled(printer, phase_every_s)
        return evaluation

    async def _load(self, blob: bytes, after: int) -> None:
        self.order.restore(after)
        self.server = await self._compute(self._restore, blob)
        if self.server is not None and self.server.publishes:  # the replicas go back with it
            await self.publisher.publish(self.server, wait=True)

    def _evaluate(self, weights: dict[str, State]) -> tuple[float, float]:
        return self.evaluations.now(weights, self.server)  # the server as it is by then

    def _state(self) -> bytes:
        return dumps({"server": self.server, "rng": rng_state()})

    def _restore(self, blob: bytes) -> Server:
        """A checkpoint's state (`_state`) written into the server and this process's RNG."""
        state = loads(blob, {"server": self.server, "rng": rng_state()}, self.device)
        set_rng_state(state["rng"])  # dropout draws from the process's generator
        return state["server"]

    # -- queue plumbing ------------------------------------------------------------------------
    def _put(self, item: Request | Control) -> None:
        if self.worker is None:  # the event loop exists only once the first call arrives
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        self.queue.put_nowait(item)

    async def _ask(self, req: Request) -> Any:
        req.future = asyncio.get_running_loop().create_future()
        self._put(req)
        return await req.future

    async def _control(self, action: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """`action(*args)`, run by the worker: it alone touches the server role."""
        future = asyncio.get_running_loop().create_future()
        self._put(Control(functools.partial(action, *args), future))
        return await future

    async def _next(self, timeout: float | None = None) -> Request | Control | None:
        """The next queued item, or None after `timeout` seconds. The pending `get` survives a
        timeout (cancelling a Queue.get can lose an item)."""
        assert self.queue is not None
        if self.getter is None:
            self.getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self.getter}, timeout=timeout)
        if not done and not self.queue.empty():  # filed meanwhile, not yet handed to the getter:
            done, _ = await asyncio.wait({self.getter})  # no evaluation step before it
        if not done:
            return None
        item, self.getter = self.getter.result(), None
        return item

    async def _accept(self, item: Request | Control) -> None:
        if isinstance(item, Control):
            await item.run()
        else:
            self.order.file(item)

    async def _compute(self, fn: Callable, *args: Any) -> Any:
        """The maths, on the event loop's thread: handing each request to a compute thread and
        back cost ~15% of exact throughput here. Requests arriving meanwhile wait in Ray's
        queue and are filed as soon as the step ends, so coalescing still sees them."""
        with autocast(self.cfg, self.device), phases_reported_to(self.phases):
            return fn(*args)

    async def _work(self) -> None:
        while True:
            try:
                item = await self._next(timeout=0 if self.evaluations.pending else None)
                if item is None:  # nothing to serve: a step of the oldest pending evaluation
                    self.evaluations.step()
                    continue
                await self._accept(item)
                while batch := await self._gather():
                    await self._process(batch)
                await self._maybe_end_round()
            except Exception as e:  # a bug here must not leave every caller waiting forever
                log.exception("S-Server worker")
                self.order.abort(f"S-Server worker failed: {e!r}")

    # -- the worker's steps --------------------------------------------------------------------
    async def _gather(self) -> list[Request]:
        """The next batch: one request (`exact`, or one that cannot be coalesced), else the
        ready requests of the same kind arriving within max_wait, at most max_batch."""
        first = self.order.next()
        if first is None:
            return []
        batch = [first]
        if self.order.exact or self._batch_handler(first.kind) is None:
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            nxt = self.order.next(first.kind)
            if nxt is not None:
                batch.append(nxt)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self.order.all_blocked_on(batch):
                break
            item = await self._next(remaining)
            if item is None:
                break
            await self._accept(item)
        return batch

    async def _process(self, batch: list[Request]) -> None:
        live = self.order.still_open(batch)
        if not live:
            return
        fn = self._batch_handler(live[0].kind) if len(live) > 1 else None
        try:
            if fn is not None:
                results = await self._compute(self._run_batch, fn, live)
            else:
                results = [await self._compute(self._run_one, live[0])]
        except Exception as e:  # noqa: BLE001 - handed to the clients / the round's end
            self.order.failed(live, e)
            return
        self.batch_sizes[len(live)] += 1
        for r, result in zip(live, results, strict=True):
            r.answer(result)
        await self.publisher.after_step(self.server)

    async def _maybe_end_round(self) -> None:
        """Answers the round's end once every client is done: the server's metrics, with the
        round's peak GPU memory (`peak_gpu_mib_server`, stateless `peak_gpu_mib_replicas`)."""
        end = self.order.finish()
        if end is None:
            return
        try:
            (t,) = end.args
            metrics = await self._compute(self.server.end_round, t) if self.server else {}
            await self.publisher.after_step(self.server, wait=True)
            peaks = peak_gpu_columns(server=peak_gpu_mib(self.device),
                                     replicas=await self.publisher.peaks())  # fmt: skip
            metrics.update(peaks)
        except Exception as e:  # noqa: BLE001
            end.fail(e)
        else:
            end.answer(metrics)

    def _batch_handler(self, kind: str) -> Callable[[list[tuple]], list] | None:
        """The server's handler of several `kind` requests at once (`Server.batch_handler`);
        None: they are served one at a time."""
        return self.server.batch_handler(kind) if self.server is not None else None

    # -- the maths, run by `_compute` ----------------------------------------------------------
    def _run_one(self, req: Request) -> Any:
        handler = getattr(self.server, f"on_{req.kind}")
        return pack(handler(req.cid, *unpack(req.args, self.device)))

    def _run_batch(self, fn: Callable, reqs: list[Request]) -> list[Any]:
        return pack(fn([(r.cid, *unpack(r.args, self.device)) for r in reqs]))
