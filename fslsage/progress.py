"""Progress lines: the time a run has left, from its recent rounds, and long phases inside a
round (fsl_sage's alignment) reported at most every few seconds.

Nothing here imports torch, Ray or MLflow: the sweep's driver uses it too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

RECENT_ROUNDS = 5  # the time left is read from the pace of this many last rounds
PHASE_EVERY_S = 5.0  # a long phase inside a round says where it stands at most this often


def eta_seconds(rows: Sequence[Mapping[str, float]], rounds: int, budget_gib: float,
                recent: int = RECENT_ROUNDS) -> float | None:  # fmt: skip
    """Seconds left after the last row: the rounds left (to `rounds`, or fewer where the pace
    of communication spends `budget_gib` first) times the recent seconds per round. `rows` are
    one per finished round with `round`, `wall_s` (since the first round began) and `comm_gib`
    (cumulative). None before any round."""
    if not rows:
        return None
    last = rows[-1]
    left = rounds - int(last["round"])
    if left <= 0 or last["comm_gib"] >= budget_gib:
        return 0.0
    window = list(rows[-(recent + 1) :])
    if len(window) > 1:
        n = len(window) - 1
        seconds = (window[-1]["wall_s"] - window[0]["wall_s"]) / n
        gib = (window[-1]["comm_gib"] - window[0]["comm_gib"]) / n
    else:  # after the first round: its own pace
        seconds, gib = last["wall_s"], last["comm_gib"]
    if gib > 0:
        left = min(left, math.ceil((budget_gib - last["comm_gib"]) / gib - 1e-9))
    return max(left, 0) * max(seconds, 0.0)


def format_duration(seconds: float | None) -> str:
    """42s, 3m05s, 2h07m; ? when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Throttled:
    """Passes a message on, with the time since it was made (a round's start), only when
    `every_s` have passed since it last did: a phase shorter than that says nothing."""

    def __init__(self, emit: Callable[[str], None], every_s: float = PHASE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.emit, self.every_s, self.clock = emit, every_s, clock
        self.started = self.last = clock()

    def __call__(self, text: str) -> None:
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.emit(f"{text} ({format_duration(now - self.started)} into the round)")


_phase: ContextVar[Throttled | None] = ContextVar("fslsage_phase", default=None)


@contextmanager
def phases_reported(emit: Callable[[str], None] | None,
                    every_s: float | None = None) -> Iterator[None]:  # fmt: skip
    """While active, `report_phase` in this thread goes to `emit`, at most every `every_s`
    (default PHASE_EVERY_S)."""
    every = PHASE_EVERY_S if every_s is None else every_s
    with phases_reported_to(Throttled(emit, every) if emit is not None else None):
        yield


@contextmanager
def phases_reported_to(report: Throttled | None) -> Iterator[None]:
    """While active, `report_phase` in this thread goes to `report` (one that lasts a round,
    across many calls: the Ray S-Server's)."""
    token = _phase.set(report)
    try:
        yield
    finally:
        _phase.reset(token)


def phase_every_s() -> float | None:
    """How often the run printing in this thread wants to hear of a long phase; None if none
    does. A runtime hands it on to the processes that run the phases (the Ray S-Server)."""
    report = _phase.get()
    return None if report is None else report.every_s


def report_phase(text: str) -> None:
    """Where a long phase stands (e.g. "aligning: epoch 40/100"); a no-op unless a run
    prints its progress in this thread (`phases_reported`). Cheap enough for every epoch."""
    report = _phase.get()
    if report is not None:
        report(text)
