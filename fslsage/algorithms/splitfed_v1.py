"""SplitFed v1 ("SplitFed-MS", Thapa et al.): like v2, but the S-Server keeps one copy of the
server model per client; at round end the copies are averaged (inside the S-Server, so it is not
network traffic) and the average is loaded into every copy."""

from __future__ import annotations

import copy

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import Server, make_optimizer, server_step, weighted_average
from fslsage.algorithms.splitfed_v2 import SplitFedV2


class PerClientServer(Server):
    def __init__(self, model, cfg, num_clients):
        super().__init__(model, cfg, num_clients)
        # Every copy keeps its own optimizer state across rounds, like a client's optimizer.
        self.copies = [copy.deepcopy(model) for _ in range(num_clients)]
        self.copy_opts = [make_optimizer(m, cfg) for m in self.copies]
        self.samples_seen = [0] * num_clients

    def scheduled_optimizers(self):
        return [self.opt, *self.copy_opts]

    def on_exchange(self, cid, z, y):
        smoothing = self.cfg.label_smoothing
        loss, grad = server_step(self.copies[cid], self.copy_opts[cid], z, y, smoothing)
        self.samples_seen[cid] += len(y)
        return grad, loss

    def end_round(self, t):
        used = [i for i, n in enumerate(self.samples_seen) if n > 0]
        if used:
            avg = weighted_average(
                [self.copies[i].state_dict() for i in used], [self.samples_seen[i] for i in used]
            )
            for m in [self.model, *self.copies]:
                m.load_state_dict(avg)
        self.samples_seen = [0] * self.num_clients
        return super().end_round(t)


@ALGORITHMS.register("splitfed_v1")
class SplitFedV1(SplitFedV2):
    server_class = PerClientServer
    stateless_server = False  # a server copy per client: no one shared model to replicate
