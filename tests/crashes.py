"""Fault injection for the recovery tests (and bench/gpu_check.py): subclasses of the actor
classes whose process exits at a chosen point once armed by a Ray call (`arm_crash`). A test
has the runtime start them (`RayRuntime(prepared, actor_classes=CRASHING)`); Ray restarts a
dead actor from its class in a fresh process, unarmed, so each fault happens once."""

from __future__ import annotations

import os
import sys
from typing import Any

import ray.cloudpickle

from actors.client_pool import ClientActor
from actors.replica import ServerReplica
from actors.runtime import ActorClasses
from actors.s_server import SServer
from fslsage.algorithms.base import ClientReport, State

# Ray's workers cannot import this module (tests/ is not on their path): its classes go by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def die() -> None:
    os._exit(1)  # the whole process at once, as a crash: no clean-up, no answer to anyone


class CrashingClientActor(ClientActor):
    crash_at: tuple[int, int] | None = None

    def arm_crash(self, t: int, cid: int) -> None:
        """The process exits as it is about to run client `cid` in round t."""
        self.crash_at = (t, cid)

    def _run_client(self, t: int, epoch: int, weights: dict[str, State], cid: int) -> ClientReport:
        if self.crash_at == (t, cid):
            die()
        return super()._run_client(t, epoch, weights, cid)

    def _play(self, t: int, epoch: int, weights: dict[str, State], cid: int, events: list) -> Any:
        if self.crash_at == (t, cid):  # gas: before the client's first event
            die()
        return super()._play(t, epoch, weights, cid, events)


class CrashingSServer(SServer):
    crash_at_opening: int | None = None

    async def arm_crash(self, t: int) -> None:
        """The process exits as it is about to open round t."""
        self.crash_at_opening = t

    async def _open(self, t: int, *args: Any) -> Any:
        if self.crash_at_opening == t:
            die()
        return await super()._open(t, *args)


class CrashingReplica(ServerReplica):
    crash_after_filing = False

    def arm_crash(self) -> None:
        """The process exits after filing its next gradient record, before answering it."""
        self.crash_after_filing = True

    def exchange(self, epoch: int, cid: int, seq: int, *args: Any) -> Any:
        answer = super().exchange(epoch, cid, seq, *args)  # filed with the reducer by now
        if self.crash_after_filing:
            die()
        return answer


CRASHING = ActorClasses(CrashingClientActor, CrashingSServer, CrashingReplica)
