"""The S-Server as one asyncio Ray actor (SPEC §7).

Every request — an upload, a gradient exchange, an alignment job, a client's "round done"
marker and the F-Server's control calls — goes into one `asyncio.Queue`, drained by one worker
coroutine, the only code that touches the server role. Client requests arrive as Ray calls of
`submit` or, from client actors on this node, through the Unix socket of `actors.channel`,
which hands them to `submit` as well; that socket serves only peers that prove they know the
run's channel key, which this actor makes as it opens the channel and gives only to callers of
`channel` (the run's client actors, through Ray): anyone on the machine can see and connect to
the socket, and a frame is unpickled. Requests carry (epoch, client id,
sequence number): Ray does not keep the order of calls to an async actor, and a restarted round
must not see stale requests. Requests of a round attempt that has not begun yet wait for its
`begin_round`, so the F-Server never waits for that call to return; and a `begin_round` that
follows an attempt still running waits for that attempt's end, so the F-Server submits round
t + 1 before round t is over. `begin_round` also
snapshots the server to evaluate the previous round's global model on: the evaluation runs a
test batch at a time whenever no request is ready, off the round's critical path (a request
waits at most one `eval_batch_size` batch).

Batching policies:
  * ``exact``: requests one at a time, all of the lowest-id client still running before any
    other client's, each client's in its own order — the order of the in-process runtime, so
    metrics are identical to it. For gas the opening lists the turns instead: whose request
    comes next in the simulated-time schedule.
  * ``coalesce``: up to `max_batch` ready requests of the same kind that arrive within
    `max_wait_ms` are concatenated into one forward/backward and ONE optimizer step; each client
    gets back the gradient of its own mean loss, all at the pre-step weights. A documented
    semantic change: fewer, larger server steps (measured in bench/server_batching.py). Only
    the kinds the server has a batched handler for are coalesced (`Server.batch_handler`: today
    the shared-model exchanges of sl and splitfed_v2, the uploads of cse_fsl and fsl_sage);
    everything else still runs one request at a time.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.channel import ANSWERED, new_key, serve
from actors.common import (
    DataBundle,
    actor_device,
    assigned_resources,
    dumps,
    loads,
    pack,
    unpack,
)
from fslsage.algorithms.base import Algorithm, Server, State
from fslsage.checkpoint import rng_state, set_rng_state
from fslsage.experiment import apply_compute_settings, evaluate, evaluation_steps
from fslsage.memory import peak_gpu_columns, peak_gpu_mib
from fslsage.precision import autocast

log = logging.getLogger(__name__)

# "gradient": a stateless replica files a client's gradient record (server_mode: stateless)
CLIENT_KINDS = ("upload", "exchange", "align", "done", "gradient")
ROUND_KINDS = (*CLIENT_KINDS, "end")  # requests that belong to one round attempt
BATCHING = ("exact", "coalesce")
REPLICA_PEAK_TIMEOUT_S = 5.0  # how long the round's end waits for a replica's memory reading


class RoundAborted(RuntimeError):
    """The request belongs to a round attempt the F-Server has abandoned (recovery)."""


class StateLost(RuntimeError):
    """The S-Server does not hold the state its round should start from: Ray restarted it
    between rounds, with nothing in flight to fail (the F-Server restores a checkpoint)."""


@dataclass
class Request:
    kind: str
    cid: int = -1
    seq: int = -1
    epoch: int = -1
    args: tuple = ()
    future: asyncio.Future | None = None
    arrival: int = 0


# ----------------------------------------------------------------------------- the actor
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
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        apply_compute_settings(algo.cfg)  # as the in-process runtime: the same sums
        self.algo, self.cfg = algo, algo.cfg
        self.device = actor_device(self.cfg, gpu_fraction, "S-Server")
        self.server = algo.new_server(self.device)
        if self.server is not None:  # shared once (gas's logit adjustment)
            self.server.set_label_counts(data.label_counts)
        self.info = data.info
        # on the evaluating device once, as stored (uint8 images): no copy per evaluation
        self.test_x, self.test_y = (t.to(self.device) for t in data.test_set())
        self.batching, self.max_batch, self.max_wait = batching, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[Request] | None = None
        self.worker: asyncio.Task | None = None
        self.getter: asyncio.Task | None = None
        self.arrivals = itertools.count()
        self.batch_sizes: Counter[int] = Counter()
        self.early: list[Request] = []  # requests of a round attempt not begun yet
        self.deferred: list[Request] = []  # openings that wait for the attempt they follow to end
        self.crash_at_opening: int | None = None
        self.channel_path: str | None = None
        self.channel_key: bytes | None = None  # proves a peer of the channel is this run's
        # the round attempt whose end this server's state follows (0: the initial state)
        self.state_after = 0
        self.rejected: tuple[int, int] | None = None  # (epoch, after) of a lost-state opening
        # evaluations begun at openings, run a test batch at a time while no request is ready
        self.evaluations: deque[tuple[Generator, asyncio.Future]] = deque()
        # server_mode stateless: the replicas this reducer publishes its weights to
        self.replica_handles: list[Any] = []
        self.publication = 0  # weights published so far (a restore publishes again)
        self.published_version = 0  # the reducer step they were taken at
        self.pushes: set[asyncio.Future] = set()
        self._reset_round(epoch=-1)

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
        the client of each request in the order `exact` serves them (one request a turn)."""
        args = (t, epoch, list(cids), after, previous_global, handover, turns)
        evaluation = await self._ask(Request("begin", args=args))
        return None if evaluation is None else await evaluation

    async def end_round(self, t: int, epoch: int) -> dict[str, float]:
        """Answers once every client of round attempt `epoch` is done: the round's server
        metrics."""
        return await self._ask(Request("end", epoch=epoch, args=(t,)))

    async def evaluate(self, weights: dict[str, State]) -> tuple[float, float]:
        return await self._ask(Request("evaluate", args=(weights,)))

    async def state(self) -> bytes:
        return await self._ask(Request("state"))

    async def load_state(self, blob: bytes, after: int) -> None:
        """Restores a checkpoint taken once round attempt `after` had ended; aborts the open
        round (its waiting clients get RoundAborted)."""
        await self._ask(Request("load", args=(blob, after)))

    async def stats(self) -> dict[str, Any]:
        """How many batches of each size were processed (the batching benchmark and tests)."""
        return await self._ask(Request("stats"))

    async def where(self) -> dict[str, Any]:
        return assigned_resources()

    # -- stateless mode: this actor is the reducer ---------------------------------------------
    async def published(self) -> tuple[int, State]:
        """(publication number, weights) a replica answers with."""
        return self.publication, pack(self.server.published())

    async def register_replica(self, replica: Any) -> None:
        """A replica joins: it gets every publication from now on, and the current one (it may
        have asked for the weights before a step)."""
        self.replica_handles.append(replica)
        await self._push([replica])

    async def replicas(self) -> list[Any]:
        return list(self.replica_handles)

    async def _publish_if_stepped(self, wait: bool = False) -> None:
        """After the reducer stepped: its new weights to every replica."""
        if self._publishes() and self.server.version != self.published_version:
            await self._publish(wait)

    async def _publish(self, wait: bool) -> None:
        """The reducer's weights as the next publication, to every replica; `wait` for them to
        have them (the round's end: the next round's requests must see them)."""
        self.published_version = self.server.version
        self.publication += 1
        push = self._push(list(self.replica_handles))
        if wait:
            await push
        else:  # mid-round: the replicas catch up while requests go on
            task = asyncio.ensure_future(push)
            self.pushes.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self.pushes.discard)

    async def _push(self, replicas: list[Any]) -> None:
        state = ray.put(pack(self.server.published()))
        calls = [r.publish.remote(self.publication, state) for r in replicas]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for replica, result in zip(replicas, results, strict=True):
            dead = isinstance(result, ray.exceptions.ActorDiedError)
            if dead and replica in self.replica_handles:  # killed for good (a restarting one
                self.replica_handles.remove(replica)  # pulls the weights as it starts)

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

    async def arm_crash(self, t: int) -> None:
        """Test hook: the process exits when it is about to open round t."""
        self.crash_at_opening = t

    # -- queue plumbing ------------------------------------------------------------------------
    def _put(self, req: Request) -> None:
        if self.worker is None:  # the event loop exists only once the first call arrives
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        req.arrival = next(self.arrivals)
        self.queue.put_nowait(req)

    async def _ask(self, req: Request) -> Any:
        req.future = asyncio.get_running_loop().create_future()
        self._put(req)
        return await req.future

    async def _next(self, timeout: float | None = None) -> Request | None:
        """The next queued request, or None after `timeout` seconds. The pending `get` survives a
        timeout (cancelling a Queue.get can lose an item)."""
        assert self.queue is not None
        if self.getter is None:
            self.getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self.getter}, timeout=timeout)
        if not done and not self.queue.empty():  # filed meanwhile, not yet handed to the getter:
            done, _ = await asyncio.wait({self.getter})  # no evaluation step before it
        if not done:
            return None
        req, self.getter = self.getter.result(), None
        return req

    async def _compute(self, fn: Callable, *args: Any) -> Any:
        """The maths, on the event loop's thread: handing each request to a compute thread and
        back cost ~15% of exact throughput here. Requests arriving meanwhile wait in Ray's
        queue and are filed as soon as the step ends, so coalescing still sees them."""
        with autocast(self.cfg, self.device):
            return fn(*args)

    async def _work(self) -> None:
        while True:
            try:
                req = await self._next(timeout=0 if self.evaluations else None)
                if req is None:  # nothing to serve: a step of the oldest pending evaluation
                    self._evaluation_step()
                    continue
                await self._accept(req)
                while True:
                    while batch := await self._gather():
                        await self._process(batch)
                    if not await self._maybe_end_round():
                        break  # else a deferred opening may have filed requests: serve them
            except Exception as e:  # a bug here must not leave every caller waiting forever
                log.exception("S-Server worker")
                self._abort(f"S-Server worker failed: {e!r}")

    # -- round state ---------------------------------------------------------------------------
    def _reset_round(
        self, epoch: int, cids: list[int] | None = None, turns: list[int] | None = None
    ) -> None:
        self.epoch, self.order = epoch, cids or []
        # exact: whose request is served next — each client in `order` until it is done, or,
        # given `turns`, the turns' clients one request each
        self.turns = turns
        self.pos = 0  # exact: index in `order` (or `turns`) of the client being served
        self.pending: dict[int, dict[int, Request]] = {c: {} for c in self.order}
        self.next_seq = dict.fromkeys(self.order, 0)
        self.done: set[int] = set()
        self.end_req: Request | None = None
        self.errors: list[BaseException] = []

    def _abort(self, reason: str) -> None:
        """Fails everything the open round still holds."""
        waiting = [r for per in self.pending.values() for r in per.values()]
        if self.end_req is not None:
            waiting.append(self.end_req)
        for r in waiting:
            _fail(r, RoundAborted(reason))

    def _head(self, cid: int) -> Request | None:
        """Client cid's next request if it has arrived; a "done" marker is consumed here."""
        req = self.pending[cid].get(self.next_seq[cid])
        if req is not None and req.kind == "done":
            self._consume(req)
            self.done.add(cid)
            return None
        return req

    def _consume(self, req: Request) -> None:
        del self.pending[req.cid][req.seq]
        self.next_seq[req.cid] += 1

    def _pop(self, kind: str | None) -> Request | None:
        """The next request to serve (of `kind`, if given), or None if it has not arrived."""
        if self.batching == "exact" and self.turns is not None:
            if self.pos == len(self.turns):  # every turn served: only "done" markers are left
                for cid in self.order:
                    self._head(cid)
                return None
            req = self._head(self.turns[self.pos])
            if req is None or (kind is not None and req.kind != kind):
                return None
            self._consume(req)
            self.pos += 1
            return req
        if self.batching == "exact":
            while self.pos < len(self.order):
                cid = self.order[self.pos]
                req = self._head(cid)
                if cid in self.done:
                    self.pos += 1
                    continue
                if req is None or (kind is not None and req.kind != kind):
                    return None
                self._consume(req)
                return req
            return None
        best = None  # coalesce: the earliest-arrived request that is next for its client
        for cid in self.order:
            req = self._head(cid)
            if req is None or (kind is not None and req.kind != kind):
                continue
            if best is None or req.arrival < best.arrival:
                best = req
        if best is not None:
            self._consume(best)
        return best

    def _nobody_else(self, batch: list[Request]) -> bool:
        """Every client still running is blocked on a request in `batch`: waiting is pointless."""
        blocked = {r.cid for r in batch if r.kind in ANSWERED}
        return all(cid in self.done or cid in blocked for cid in self.order)

    # -- the worker's steps --------------------------------------------------------------------
    async def _accept(self, req: Request) -> None:
        if req.kind == "begin" and self._follows_unfinished(req.args[3]):
            self.deferred.append(req)  # the F-Server submitted this round ahead of its previous
            return
        if req.kind in ROUND_KINDS:
            if self.rejected is not None and req.epoch == self.rejected[0]:
                _fail(req, self._state_lost())
            elif req.epoch > self.epoch:  # arrived before its begin_round: filed by that
                self.early.append(req)
            elif req.epoch < self.epoch or (req.kind != "end" and req.cid not in self.pending):
                _fail(req, RoundAborted(f"request of round attempt {req.epoch}"))
            elif req.kind == "end":
                self.end_req = req  # answered by _maybe_end_round
            elif req.kind == "gradient" and req.seq < self.next_seq[req.cid]:
                pass  # filed again by another replica after it was applied: kept once
            else:
                self.pending[req.cid][req.seq] = req
            return
        try:
            result = await self._control(req)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            _fail(req, e)
        else:
            _answer(req, result)

    def _follows_unfinished(self, after: int) -> bool:
        """Whether an opening that follows attempt `after` must wait: this server (not a
        restarted blank one, epoch -1) has begun or will begin that attempt, and it has not
        ended."""
        return self.epoch != -1 and after != self.state_after and after >= self.epoch

    async def _refile_deferred(self) -> None:
        """Accepts the deferred openings again, now that an attempt opened or ended."""
        deferred, self.deferred = self.deferred, []
        for r in deferred:
            await self._accept(r)

    async def _control(self, req: Request) -> Any:
        if req.kind == "begin":
            t, epoch, cids, after, previous_global, handover, turns = req.args
            if self.crash_at_opening == t:
                os._exit(1)  # fault injection for the recovery test: the process dies here
            if after != self.state_after:  # this attempt's requests fail, now and when they come
                self.rejected = (epoch, after)
                await self._refile_early()
                raise self._state_lost()
            evaluation = None  # snapshotted before anything of this round touches the server
            if previous_global is not None:
                evaluation = self._begin_evaluation(previous_global)
            if handover is not None:  # the warm start's aggregate, as round 1 opens
                self.server.start_from(handover)
            if self.server is not None:
                self.server.begin_round(t)
            self._abort(f"round attempt {epoch} began")
            self._reset_round(epoch, cids, turns)
            await self._refile_early()
            await self._refile_deferred()
            return evaluation
        if req.kind == "evaluate":
            return await self._compute(self._evaluate, *req.args)
        if req.kind == "state":
            return await self._compute(lambda: dumps({"server": self.server, "rng": rng_state()}))
        if req.kind == "load":
            self._abort("state restored from a checkpoint")
            early, self.early, self.deferred = [*self.early, *self.deferred], [], []
            for r in early:  # attempts the F-Server abandoned before they began here
                _fail(r, RoundAborted("state restored from a checkpoint"))
            self._reset_round(epoch=-1)
            blob, self.state_after = req.args
            self.rejected = None
            self.server = await self._compute(self._restore, blob)
            if self._publishes():  # the replicas go back with it
                await self._publish(wait=True)
            return None
        if req.kind == "stats":
            return {"batch_sizes": dict(self.batch_sizes)}
        raise ValueError(f"unknown request kind {req.kind!r}")

    async def _gather(self) -> list[Request]:
        """The next batch: one request (`exact`, or one that cannot be coalesced), else the
        ready requests of the same kind arriving within max_wait, at most max_batch."""
        first = self._pop(None)
        if first is None:
            return []
        batch = [first]
        if self.batching == "exact" or self._batch_handler(first.kind) is None:
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            nxt = self._pop(first.kind)
            if nxt is not None:
                batch.append(nxt)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self._nobody_else(batch):
                break
            req = await self._next(remaining)
            if req is None:
                break
            await self._accept(req)
        return batch

    async def _process(self, batch: list[Request]) -> None:
        live = [r for r in batch if r.epoch == self.epoch]
        for r in batch:
            if r.epoch != self.epoch:  # a checkpoint was restored while the batch formed
                _fail(r, RoundAborted(f"request of round attempt {r.epoch}"))
        if not live:
            return
        fn = self._batch_handler(live[0].kind) if len(live) > 1 else None
        try:
            if fn is not None:
                results = await self._compute(self._run_batch, fn, live)
            else:
                results = [await self._compute(self._run_one, live[0])]
        except Exception as e:  # noqa: BLE001 - handed to the clients / the round's end
            for r in live:
                if r.future is None:
                    self.errors.append(e)
                _fail(r, e)
            return
        self.batch_sizes[len(live)] += 1
        for r, result in zip(live, results, strict=True):
            _answer(r, result)
        await self._publish_if_stepped()

    async def _maybe_end_round(self) -> bool:
        """Answers the round's end once every client is done; True if it did."""
        if self.end_req is None or not all(cid in self.done for cid in self.order):
            return False
        req, self.end_req = self.end_req, None
        if self.errors:
            _fail(req, self.errors[0])
            following = [r for r in self.deferred if r.args[3] == req.epoch]
            self.deferred = [r for r in self.deferred if r.args[3] != req.epoch]
            for r in following:  # they would wait forever for a state that never came
                _fail(r, RoundAborted(f"round attempt {req.epoch} failed: {self.errors[0]!r}"))
        else:
            self.state_after = req.epoch
            try:
                (t,) = req.args
                metrics = await self._compute(self.server.end_round, t) if self.server else {}
                await self._publish_if_stepped(wait=True)
                metrics.update(await self._peak_gpu_columns())
            except Exception as e:  # noqa: BLE001
                _fail(req, e)
            else:
                _answer(req, metrics)
        await self._refile_deferred()
        return True

    async def _peak_gpu_columns(self) -> dict[str, float]:
        """The round's `peak_gpu_mib_server` and, stateless, `peak_gpu_mib_replicas` (each
        process's peak since its last reading; none off CUDA). The round's end is answered
        after it, so no request of the next round has reached a replica yet; a replica that does
        not answer within REPLICA_PEAK_TIMEOUT_S (dead, restarting) is left out."""
        replicas = []
        if self.replica_handles:
            calls = [asyncio.ensure_future(r.peak_gpu_mib.remote()) for r in self.replica_handles]
            done, late = await asyncio.wait(calls, timeout=REPLICA_PEAK_TIMEOUT_S)
            for call in late:
                call.cancel()
            replicas = [c.result() for c in done if c.exception() is None]
        return peak_gpu_columns(server=peak_gpu_mib(self.device), replicas=replicas)

    async def _refile_early(self) -> None:
        """Files the requests that came before their round's opening, now that one opened (or
        was rejected): this attempt's are filed (or fail), older ones fail, newer ones wait."""
        early, self.early = self.early, []
        for r in early:
            await self._accept(r)

    def _state_lost(self) -> StateLost:
        assert self.rejected is not None
        epoch, after = self.rejected
        return StateLost(f"round attempt {epoch} starts from the S-Server state after attempt "
                         f"{after}, but this S-Server holds the state after attempt "
                         f"{self.state_after}: Ray restarted it")  # fmt: skip

    def _batch_handler(self, kind: str) -> Callable[[list[tuple]], list] | None:
        """The server's handler of several `kind` requests at once (`Server.batch_handler`);
        None: they are served one at a time."""
        return self.server.batch_handler(kind) if self.server is not None else None

    def _publishes(self) -> bool:
        """Whether the server's weights go out to stateless replicas (`Server.publishes`)."""
        return self.server is not None and self.server.publishes

    # -- on the compute thread -----------------------------------------------------------------
    def _run_one(self, req: Request) -> Any:
        handler = getattr(self.server, f"on_{req.kind}")
        return pack(handler(req.cid, *unpack(req.args, self.device)))

    def _run_batch(self, fn: Callable, reqs: list[Request]) -> list[Any]:
        return pack(fn([(r.cid, *unpack(r.args, self.device)) for r in reqs]))

    def _evaluate(self, weights: dict[str, State]) -> tuple[float, float]:
        return evaluate(self._global_model(weights), self.test_x, self.test_y, self.info,
                        self.cfg.eval_batch_size, self.device)  # fmt: skip

    def _global_model(self, weights: dict[str, State], snapshot: bool = False) -> torch.nn.Module:
        """The global model to evaluate: `weights` ∘ this server's model, or ∘ a copy of it as
        it is now (the frozen weights of a LoRA model are shared, not copied)."""
        server_model = self.server.eval_model() if self.server is not None else None
        if snapshot and server_model is not None:
            frozen = {id(p): p for p in server_model.parameters() if not p.requires_grad}
            server_model = copy.deepcopy(server_model, frozen)
        return self.algo.eval_module(weights, server_model, self.device)

    def _begin_evaluation(self, weights: dict[str, State]) -> asyncio.Future:
        """A future for the evaluation of `weights` with the server as it is now, computed by
        `_evaluation_step`s; an error in it is the future's."""
        future = asyncio.get_running_loop().create_future()
        try:
            model = self._global_model(weights, snapshot=True)
        except Exception as e:  # noqa: BLE001 - the round still opens; begin's caller sees it
            future.set_exception(e)
            return future
        steps = evaluation_steps(model, self.test_x, self.test_y, self.info,
                                 self.cfg.eval_batch_size, self.device)  # fmt: skip
        self.evaluations.append((steps, future))
        return future

    def _restore(self, blob: bytes) -> Server:
        """A checkpoint's state (`state`) written into the server and this process's RNG."""
        state = loads(blob, {"server": self.server, "rng": rng_state()}, self.device)
        set_rng_state(state["rng"])  # dropout draws from the process's generator
        return state["server"]

    def _evaluation_step(self) -> None:
        """One test batch of the oldest pending evaluation (its result, after the last)."""
        steps, future = self.evaluations[0]
        try:
            with autocast(self.cfg, self.device):
                next(steps)
        except StopIteration as finished:
            self.evaluations.popleft()
            future.set_result(finished.value)
        except Exception as e:  # noqa: BLE001 - handed to begin_round's caller
            self.evaluations.popleft()
            future.set_exception(e)


def _answer(req: Request, result: Any) -> None:
    if req.future is not None and not req.future.done():
        req.future.set_result(result)


def _fail(req: Request, error: BaseException) -> None:
    if req.future is not None and not req.future.done():
        req.future.set_exception(error)
