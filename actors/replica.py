"""Stateless S-Server replicas on Ray (`server_mode: stateless`, SPEC §2; the maths is
`fslsage.stateless`).

A replica answers a client's exchange with the weights the reducer last published to it. The
reducer is the S-Server actor: it files each gradient record like any client request (so
`exact` applies them in client and request order), steps every `sync_every` records and
publishes the new weights to every registered replica. A replica files its record and waits for
the filing before it answers: a replica killed at any point loses no update — its client asks
the next replica, and a record filed twice under the same (client, request) is kept once.
Replicas can be added (`RayRuntime.add_replica`) or killed at any time.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ray

from actors.common import actor_device, assigned_resources, pack, unpack
from fslsage.algorithms.base import Algorithm, State
from fslsage.experiment import apply_compute_settings
from fslsage.memory import peak_gpu_mib
from fslsage.precision import autocast
from fslsage.stateless import gradient_store_dir, replica_answer, save_record


class ServerReplica:
    def __init__(self, algo: Algorithm, reducer: Any, gpu_fraction: float = 0.0):
        apply_compute_settings(algo.cfg)  # as the in-process runtime: the same sums
        self.cfg = algo.cfg
        self.device = actor_device(self.cfg, gpu_fraction, "S-Server replica")
        self.model = copy.deepcopy(algo.split.server).to(self.device)
        self.reducer = reducer
        self.store_dir = gradient_store_dir(self.cfg)
        self.publication = -1
        self.served = 0
        self.crash_after_filing = False
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
        if self.crash_after_filing:
            os._exit(1)  # fault injection: filed, never answered
        self.served += 1
        return pack((grad, loss))

    def peak_gpu_mib(self) -> float | None:
        """This replica's peak GPU memory since the last reading (`fslsage.memory.peak_gpu_mib`),
        asked by the S-Server at each round's end."""
        return peak_gpu_mib(self.device)

    def arm_crash(self) -> None:
        """Test hook: the process exits after filing its next record, before answering."""
        self.crash_after_filing = True

    def where(self) -> dict[str, Any]:
        return {**assigned_resources(), "served": self.served, "publication": self.publication}
