"""Which request the S-Server serves next (SPEC §7), as plain Python: no Ray, no event loop.

Requests carry (round attempt, client id, sequence number): Ray keeps no order among the calls
to an async actor, and a restarted round must not see stale requests. `RoundOrder` files them
and hands out the next one to serve:

  * ``exact``: one at a time, all of the lowest-id client still running before any other
    client's, each client's in its own order — the order of the in-process runtime, so metrics
    are identical to it. For gas the opening lists the turns instead: whose request comes next
    in the simulated-time schedule (one request a turn).
  * ``coalesce``: the earliest-filed request that is next for its client; the S-Server may take
    several of one kind at once.

A request of an attempt not opened yet waits for its opening (the F-Server never waits for one);
one of an older attempt fails with RoundAborted. An opening names the attempt whose end the
server's state must follow; a server that does not hold it (Ray restarted it) fails the opening
and every request of that attempt with StateLost, and the F-Server restores a checkpoint.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

BATCHING = ("exact", "coalesce")
ANSWERED = ("exchange", "align")  # request kinds the client waits on; uploads are fire-and-forget
# "gradient": a stateless replica files a client's gradient record (server_mode: stateless)
CLIENT_KINDS = ("upload", "exchange", "align", "done", "gradient")


class RoundAborted(RuntimeError):
    """The request belongs to a round attempt the F-Server has abandoned (recovery)."""


class StateLost(RuntimeError):
    """The S-Server does not hold the state its round should start from: Ray restarted it
    between rounds, with nothing in flight to fail (the F-Server restores a checkpoint)."""


def settle(future: Any, result: Any = None, error: BaseException | None = None) -> None:
    """Answers `future` (an asyncio or concurrent.futures Future) with `result`, or fails it
    with `error`, unless nobody waits on it (None) or it is settled already."""
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class Request:
    """A client request (CLIENT_KINDS) or a round's "end". `future`: where its answer goes
    (an asyncio or concurrent.futures Future); None for a request nobody waits on."""

    kind: str
    cid: int = -1
    seq: int = -1
    epoch: int = -1
    args: tuple = ()
    future: Any = None
    arrival: int = 0  # when it was filed: `coalesce` serves the earliest first

    def answer(self, result: Any) -> None:
        settle(self.future, result)

    def fail(self, error: BaseException) -> None:
        settle(self.future, error=error)


class RoundOrder:
    """The open round attempt's requests and whose comes next; the attempt the server's state
    follows."""

    def __init__(self, batching: str = "exact"):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.exact = batching == "exact"
        self.early: list[Request] = []  # requests of an attempt not opened yet
        self.state_after = 0  # the attempt whose end the server's state follows (0: initial)
        self.rejected: tuple[int, int] | None = None  # (epoch, after) of a lost-state opening
        self.arrivals = itertools.count()
        self._reset(epoch=-1)

    def _reset(
        self, epoch: int, cids: list[int] | None = None, turns: list[int] | None = None
    ) -> None:
        self.epoch, self.order = epoch, list(cids or [])
        self.turns = turns  # gas, exact: the client of each request, in serving order
        self.pos = 0  # exact: index in `order` (or `turns`) of the client being served
        self.pending: dict[int, dict[int, Request]] = {c: {} for c in self.order}
        self.next_seq = dict.fromkeys(self.order, 0)
        self.done: set[int] = set()
        self.end: Request | None = None
        self.errors: list[BaseException] = []  # of requests nobody waits on: the end's error

    # -- control ---------------------------------------------------------------------------------
    def open(self, epoch: int, after: int, cids: list[int], turns: list[int] | None = None) -> None:
        """Opens attempt `epoch`, which starts from the state attempt `after` ended with;
        `cids`: the clients it hears from, in `exact` order. The attempt open until now is
        abandoned. StateLost if this server's state does not follow `after`: the attempt's
        requests fail with it, now and when they come."""
        if after != self.state_after:
            self.rejected = (epoch, after)
            self._refile_early()
            raise self._state_lost()
        self.abort(f"round attempt {epoch} began")
        self._reset(epoch, cids, turns)
        self._refile_early()

    def restore(self, after: int) -> None:
        """The server's state is now a checkpoint's, taken once attempt `after` had ended: every
        request of the open attempt and of those not opened yet fails with RoundAborted."""
        self.abort("state restored from a checkpoint")
        early, self.early = self.early, []
        for r in early:  # attempts the F-Server abandoned before they opened here
            r.fail(RoundAborted("state restored from a checkpoint"))
        self._reset(epoch=-1)
        self.state_after, self.rejected = after, None

    def abort(self, reason: str) -> None:
        """Fails everything the open attempt still holds."""
        waiting = [r for per in self.pending.values() for r in per.values()]
        if self.end is not None:
            waiting.append(self.end)
        for r in waiting:
            r.fail(RoundAborted(reason))

    # -- requests --------------------------------------------------------------------------------
    def file(self, req: Request) -> None:
        """Files a client request or the round's end: it waits for its turn (or, an end, for
        every client to be done), for its attempt to open, or fails at once."""
        if self.rejected is not None and req.epoch == self.rejected[0]:
            req.fail(self._state_lost())
        elif req.epoch > self.epoch:  # before its opening: filed by that
            self.early.append(req)
        elif req.epoch < self.epoch or (req.kind != "end" and req.cid not in self.pending):
            req.fail(RoundAborted(f"request of round attempt {req.epoch}"))
        elif req.kind == "end":
            self.end = req  # handed out by `finish`
        elif req.kind == "gradient" and req.seq < self.next_seq[req.cid]:
            pass  # filed again by another replica after it was applied: kept once
        else:
            req.arrival = next(self.arrivals)
            self.pending[req.cid][req.seq] = req

    def next(self, kind: str | None = None) -> Request | None:
        """The next request to serve (of `kind`, if given), taken; None if it has not come."""
        if self.exact and self.turns is not None:
            if self.pos == len(self.turns):  # every turn served: only "done" markers are left
                for cid in self.order:
                    self._head(cid)
                return None
            req = self._head(self.turns[self.pos])
            if req is None or (kind is not None and req.kind != kind):
                return None
            self._take(req)
            self.pos += 1
            return req
        if self.exact:
            while self.pos < len(self.order):
                cid = self.order[self.pos]
                req = self._head(cid)
                if cid in self.done:
                    self.pos += 1
                    continue
                if req is None or (kind is not None and req.kind != kind):
                    return None
                self._take(req)
                return req
            return None
        best = None  # coalesce: the earliest-filed request that is next for its client
        for cid in self.order:
            req = self._head(cid)
            if req is None or (kind is not None and req.kind != kind):
                continue
            if best is None or req.arrival < best.arrival:
                best = req
        if best is not None:
            self._take(best)
        return best

    def all_blocked_on(self, batch: list[Request]) -> bool:
        """Every client still running waits on an answer in `batch`: no other request can
        come, so a batch waiting for more is pointless."""
        blocked = {r.cid for r in batch if r.kind in ANSWERED}
        return all(cid in self.done or cid in blocked for cid in self.order)

    def still_open(self, batch: list[Request]) -> list[Request]:
        """The requests of `batch` of the open attempt; the others (a checkpoint was restored
        while the batch formed) fail with RoundAborted."""
        for r in batch:
            if r.epoch != self.epoch:
                r.fail(RoundAborted(f"request of round attempt {r.epoch}"))
        return [r for r in batch if r.epoch == self.epoch]

    def failed(self, batch: list[Request], error: BaseException) -> None:
        """Serving `batch` raised `error`: its requests fail, and one nobody waits on (an
        upload) fails the round's end."""
        for r in batch:
            if r.future is None:
                self.errors.append(error)
            r.fail(error)

    def finish(self) -> Request | None:
        """The round's end request once every client is done, taken: the server's state now
        follows this attempt, and the caller answers it with the round's metrics. None before,
        and for a round a request of which failed (its end fails here)."""
        if self.end is None or not all(cid in self.done for cid in self.order):
            return None
        end, self.end = self.end, None
        if self.errors:
            end.fail(self.errors[0])
            return None
        self.state_after = end.epoch
        return end

    # -- internals -------------------------------------------------------------------------------
    def _head(self, cid: int) -> Request | None:
        """Client cid's next request if it has come; a "done" marker is taken here."""
        req = self.pending[cid].get(self.next_seq[cid])
        if req is not None and req.kind == "done":
            self._take(req)
            self.done.add(cid)
            return None
        return req

    def _take(self, req: Request) -> None:
        del self.pending[req.cid][req.seq]
        self.next_seq[req.cid] += 1

    def _refile_early(self) -> None:
        """Files the requests that came before an opening: the opened attempt's are filed (or
        fail), older ones fail, newer ones wait on."""
        early, self.early = self.early, []
        for r in early:
            self.file(r)

    def _state_lost(self) -> StateLost:
        assert self.rejected is not None
        epoch, after = self.rejected
        return StateLost(f"round attempt {epoch} starts from the S-Server state after attempt "
                         f"{after}, but this S-Server holds the state after attempt "
                         f"{self.state_after}: Ray restarted it")  # fmt: skip
