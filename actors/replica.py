"""Stateless S-Server replicas on Ray (`server_mode: stateless`, SPEC §2; the maths is
`fslsage.stateless`).

A replica answers a client's exchange with the weights the reducer last published to it. The
reducer is the S-Server actor: it files each gradient record like any client request (so
`exact` applies them in client and request order), steps every `sync_every` records and
publishes the new weights to every registered replica (`Publisher`). A replica files its record
and waits for the filing before it answers: a replica killed at any point loses no update — its
client asks the next replica, and a record filed twice under the same (client, request) is kept
once. Replicas can be added (`RayRuntime.add_replica`) or killed at any time.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import ray

from actors.common import assigned_resources, pack, set_up_actor, unpack
from fslsage.algorithms.base import Algorithm, Server, State
from fslsage.memory import peak_gpu_mib
from fslsage.precision import autocast
from fslsage.stateless import gradient_store_dir, replica_answer, save_record

PEAK_TIMEOUT_S = 5.0  # how long the round's end waits for a replica's memory reading


class ServerReplica:
    def __init__(self, algo: Algorithm, reducer: Any, gpu_fraction: float = 0.0):
        self.cfg = algo.cfg
        self.device = set_up_actor(self.cfg, gpu_fraction, "S-Server replica")
        self.model = copy.deepcopy(algo.split.server).to(self.device)
        self.reducer = reducer
        self.store_dir = gradient_store_dir(self.cfg)
        self.publication = -1
        self.served = 0
        # the weights as they are now; later ones are pushed by the reducer
        self.publish(*ray.get(reducer.published.remote()))

    def publish(self, publication: int, state: State) -> None:
        """New weights from the reducer; an older publication that arrives late is ignored."""
        if publication > self.publication:
            self.model.load_state_dict(unpack(state, self.device))
            self.publication = publication

    def exchange(self, epoch: int, cid: int, seq: int, *args: Any) -> Any:
        z, y = unpack(args, self.device)
        with autocast(self.cfg, self.device):
            grad, loss, record = replica_answer(self.model, z, y, self.cfg.label_smoothing)
        record.grads = {k: v.cpu() for k, v in record.grads.items()}
        record.buffers = {k: v.cpu() for k, v in record.buffers.items()}
        if self.cfg.gradient_store == "files":
            payload: Any = save_record(self.store_dir, record)
        else:
            payload = record  # by value: the reducer holds it once the call returns
        ray.get(self.reducer.submit.remote(epoch, cid, seq, "gradient", payload))
        self.served += 1
        return pack((grad, loss))

    def peak_gpu_mib(self) -> float | None:
        """This replica's peak GPU memory since the last reading (`fslsage.memory.peak_gpu_mib`),
        asked by the S-Server at each round's end."""
        return peak_gpu_mib(self.device)

    def where(self) -> dict[str, Any]:
        return {**assigned_resources(), "served": self.served, "publication": self.publication}


class Publisher:
    """The reducer's side (the S-Server actor's, on its event loop): the replicas it publishes
    its server's weights to, and which step those weights were taken at."""

    def __init__(self) -> None:
        self.replicas: list[Any] = []
        self.publication = 0  # weights published so far (a restore publishes again)
        self.version = 0  # the reducer step they were taken at
        self.pushes: set[asyncio.Future] = set()

    def current(self, server: Server) -> tuple[int, State]:
        """(publication number, weights) a starting replica takes."""
        return self.publication, pack(server.published())

    async def register(self, replica: Any, server: Server) -> None:
        """A replica joins: it gets every publication from now on, and the current one (it may
        have asked for the weights before a step)."""
        self.replicas.append(replica)
        await self._push([replica], server)

    async def after_step(self, server: Server | None, wait: bool = False) -> None:
        """The server's new weights to every replica, if it stepped since they were published."""
        if server is not None and server.publishes and server.version != self.version:
            await self.publish(server, wait)

    async def publish(self, server: Server, wait: bool) -> None:
        """The server's weights as the next publication, to every replica; `wait` for them to
        have them (the round's end: the next round's requests must see them)."""
        self.version = server.version
        self.publication += 1
        push = self._push(list(self.replicas), server)
        if wait:
            await push
        else:  # mid-round: the replicas catch up while requests go on
            task = asyncio.ensure_future(push)
            self.pushes.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self.pushes.discard)

    async def _push(self, replicas: list[Any], server: Server) -> None:
        state = ray.put(pack(server.published()))
        calls = [r.publish.remote(self.publication, state) for r in replicas]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for replica, result in zip(replicas, results, strict=True):
            dead = isinstance(result, ray.exceptions.ActorDiedError)
            if dead and replica in self.replicas:  # killed for good (a restarting one pulls
                self.replicas.remove(replica)  # the weights as it starts)

    async def peaks(self) -> list[float | None]:
        """Each replica's peak GPU memory since its last reading. Asked at the round's end,
        before it is answered, so no request of the next round has reached a replica yet; one
        that does not answer within PEAK_TIMEOUT_S (dead, restarting) is left out."""
        if not self.replicas:
            return []
        calls = [asyncio.ensure_future(r.peak_gpu_mib.remote()) for r in self.replicas]
        done, late = await asyncio.wait(calls, timeout=PEAK_TIMEOUT_S)
        for call in late:
            call.cancel()
        return [c.result() for c in done if c.exception() is None]
