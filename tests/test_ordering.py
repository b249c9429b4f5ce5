"""The S-Server's ordering of requests (actors/ordering.py), without Ray: sequence numbers,
client order and gas's turns, round attempts, requests before their opening, lost state."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from actors.ordering import Request, RoundAborted, RoundOrder, StateLost


def req(kind: str, cid: int, seq: int, epoch: int = 1, waited: bool = True) -> Request:
    """A request; `waited`: with a future its answer or error goes to."""
    return Request(kind, cid, seq, epoch, future=Future() if waited else None)


def served(order: RoundOrder, kind: str | None = None) -> list[tuple[str, int, int]]:
    """(kind, cid, seq) of every request `order` hands out now, in order."""
    out = []
    while (r := order.next(kind)) is not None:
        out.append((r.kind, r.cid, r.seq))
    return out


def error(r: Request) -> BaseException | None:
    return r.future.exception(timeout=0) if r.future.done() else None


def test_exact_serves_each_client_in_sequence_and_the_lowest_id_first():
    order = RoundOrder("exact")
    order.open(1, after=0, cids=[0, 1])
    for r in (req("exchange", 1, 0), req("exchange", 0, 1), req("upload", 0, 0)):
        order.file(r)  # out of order: client 1 first, client 0's second before its first
    assert served(order) == [("upload", 0, 0), ("exchange", 0, 1)]
    order.file(req("done", 0, 2, waited=False))
    assert served(order) == [("exchange", 1, 0)]  # client 0 is done: client 1's turn
    assert order.finish() is None  # no end request yet, and client 1 is still running
    end = req("end", -1, -1)
    order.file(end)
    assert order.finish() is None
    order.file(req("done", 1, 1, waited=False))
    assert served(order) == []  # the marker is taken, nothing to serve
    assert order.finish() is end and order.state_after == 1


def test_gas_turns_decide_whose_request_comes_next():
    order = RoundOrder("exact")
    order.open(1, after=0, cids=[0, 1], turns=[1, 0, 1])
    order.file(req("exchange", 0, 0))
    assert served(order) == []  # client 1 has the first turn
    order.file(req("exchange", 1, 0))
    order.file(req("exchange", 1, 1))
    assert served(order) == [("exchange", 1, 0), ("exchange", 0, 0), ("exchange", 1, 1)]
    for cid, seq in ((0, 1), (1, 2)):
        order.file(req("done", cid, seq, waited=False))
    order.file(end := req("end", -1, -1))
    assert served(order) == [] and order.finish() is end


def test_coalesce_serves_the_earliest_filed_request_that_is_next_for_its_client():
    order = RoundOrder("coalesce")
    order.open(1, after=0, cids=[0, 1, 2])
    order.file(req("upload", 2, 0))
    order.file(req("exchange", 1, 1))  # waits for client 1's request 0
    order.file(req("exchange", 0, 0))
    order.file(req("upload", 1, 0))
    assert served(order, "exchange") == [("exchange", 0, 0)]  # only that kind
    assert served(order) == [("upload", 2, 0), ("upload", 1, 0), ("exchange", 1, 1)]


def test_all_blocked_on_says_when_no_other_request_can_come():
    order = RoundOrder("coalesce")
    order.open(1, after=0, cids=[0, 1, 2])
    order.file(req("done", 2, 0, waited=False))
    order.next()  # takes the marker
    asks = [req("exchange", 0, 0), req("exchange", 1, 0)]
    assert order.all_blocked_on(asks)
    assert not order.all_blocked_on(asks[:1])  # client 1 may still send one
    assert not order.all_blocked_on([req("upload", 0, 0), asks[1]])  # uploads wait on nothing


def test_requests_before_their_opening_wait_for_it_and_stale_ones_fail():
    order = RoundOrder("exact")
    order.open(1, after=0, cids=[0, 1])
    stale = req("exchange", 1, 0)
    order.file(stale)  # attempt 1's: client 0 has not finished, so it waits
    early = [req("exchange", 0, 0, epoch=2), req("end", -1, -1, epoch=2)]
    for r in early:
        order.file(r)
    assert served(order) == [] and not early[0].future.done()
    order.open(2, after=0, cids=[0, 1])  # attempt 1 abandoned (never ended: state after 0)
    assert isinstance(error(stale), RoundAborted)
    assert served(order) == [("exchange", 0, 0)] and order.end is early[1]
    late = req("exchange", 0, 1, epoch=1)
    order.file(late)
    unknown = req("exchange", 5, 0, epoch=2)  # not a client of this attempt
    order.file(unknown)
    assert isinstance(error(late), RoundAborted) and isinstance(error(unknown), RoundAborted)


def test_an_opening_after_a_state_this_server_lacks_fails_its_whole_attempt():
    order = RoundOrder("exact")  # a restarted server: the initial state (after attempt 0)
    early = req("exchange", 0, 0, epoch=4)
    order.file(early)
    with pytest.raises(StateLost, match="after attempt 3"):
        order.open(4, after=3, cids=[0])
    later = req("exchange", 0, 1, epoch=4)
    order.file(later)
    assert isinstance(error(early), StateLost) and isinstance(error(later), StateLost)
    order.restore(after=3)  # the F-Server restores the checkpoint and opens again
    order.open(5, after=3, cids=[0])
    order.file(req("exchange", 0, 0, epoch=5))
    assert served(order) == [("exchange", 0, 0)]


def test_a_restore_fails_the_open_round_and_those_not_opened_yet():
    order = RoundOrder("exact")
    order.open(1, after=0, cids=[0, 1])
    waiting = [req("exchange", 1, 0), req("end", -1, -1), req("exchange", 0, 0, epoch=2)]
    for r in waiting:
        order.file(r)
    taken = order.next()
    assert taken is None  # client 0 has sent nothing of attempt 1
    order.restore(after=0)
    assert all(isinstance(error(r), RoundAborted) for r in waiting)
    assert order.state_after == 0
    order.file(r := req("exchange", 0, 0, epoch=1))  # still in flight: waits for an opening
    assert not r.future.done()
    order.open(2, after=0, cids=[0, 1])
    assert isinstance(error(r), RoundAborted)  # attempt 1 is over
    batch = [req("exchange", 0, 0, epoch=2), req("upload", 1, 0, epoch=1)]
    assert order.still_open(batch) == batch[:1]  # one formed before a restore: it fails
    assert error(batch[0]) is None and isinstance(error(batch[1]), RoundAborted)


def test_a_failed_upload_fails_the_round_and_its_state_is_not_followed():
    order = RoundOrder("exact")
    order.open(1, after=0, cids=[0])
    order.file(upload := req("upload", 0, 0, waited=False))
    order.failed([order.next()], ValueError("bad batch"))
    order.file(req("done", 0, 1, waited=False))
    order.file(end := req("end", -1, -1))
    assert served(order) == [] and order.finish() is None
    assert isinstance(error(end), ValueError) and upload.future is None
    assert order.state_after == 0  # the next attempt starts from the state before this one
    with pytest.raises(StateLost):
        order.open(2, after=1, cids=[0])


def test_a_gradient_record_filed_again_after_it_was_applied_is_kept_once():
    order = RoundOrder("exact")
    order.open(1, after=0, cids=[0])
    order.file(req("gradient", 0, 0, waited=False))
    assert served(order) == [("gradient", 0, 0)]
    order.file(req("gradient", 0, 0, waited=False))  # another replica, after the first died
    order.file(req("gradient", 0, 1, waited=False))
    assert served(order) == [("gradient", 0, 1)]


def test_an_unknown_batching_policy_is_refused():
    with pytest.raises(ValueError, match="batching"):
        RoundOrder("fastest")
