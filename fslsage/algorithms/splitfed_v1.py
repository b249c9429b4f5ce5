"""SplitFed v1 ("SplitFed-MS", Thapa et al.): like v2, but the S-Server keeps one copy of the
server model per client; at round end the copies are averaged (inside the S-Server, so it is not
network traffic) and the average is loaded into every copy."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import Server, make_optimizer, server_step, weighted_average
from fslsage.algorithms.splitfed_v2 import SplitFedV2
from fslsage.memory import ClientStates, OnDevice, offloads_client_state


class ServerCopy(NamedTuple):
    """Client i's copy of the server model and its optimizer: every copy keeps its own optimizer
    state across rounds, like a client's optimizer."""

    model: nn.Module
    opt: torch.optim.Optimizer


class PerClientServer(Server):
    def __init__(self, model, cfg, num_clients):
        super().__init__(model, cfg, num_clients)
        device = next(model.parameters()).device
        # made on the CPU; on the device only while its client is served when offloading
        self.copies = ClientStates([self.new_copy() for _ in range(num_clients)], device,
                                   offloads_client_state(cfg, device))  # fmt: skip
        self.samples_seen = [0] * num_clients

    def new_copy(self) -> ServerCopy:
        model = copy.deepcopy(self.model).cpu()
        return ServerCopy(model, make_optimizer(model, self.cfg))

    def scheduled_optimizers(self):
        return [self.opt, *(c.opt for c in self.copies.stored())]

    def on_exchange(self, cid, z, y):
        model, opt = self.copies[cid]
        loss, grad = server_step(model, opt, z, y, self.cfg.label_smoothing)
        self.samples_seen[cid] += len(y)
        return grad, loss

    def end_round(self, t):
        used = [i for i, n in enumerate(self.samples_seen) if n > 0]
        if used:
            copies, device = self.copies.stored(), self.copies.device
            # each copy's tensors reach the device one at a time, wherever the copy is kept
            avg = weighted_average([OnDevice(copies[i].model.state_dict(), device) for i in used],
                                   [self.samples_seen[i] for i in used])  # fmt: skip
            for m in [self.model, *(c.model for c in copies)]:
                m.load_state_dict(avg)
        self.samples_seen = [0] * self.num_clients
        return super().end_round(t)


@ALGORITHMS.register("splitfed_v1")
class SplitFedV1(SplitFedV2):
    server_class = PerClientServer
    stateless_server = False  # a server copy per client: no one shared model to replicate
