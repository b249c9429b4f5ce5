"""SplitFed v2 ("SplitFed-SS", Thapa et al.): clients train in parallel against ONE shared
server model, which steps on every batch it receives; client models are averaged each round."""

from __future__ import annotations

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import (
    Algorithm,
    Batches,
    Client,
    Server,
    ServerLink,
    TrafficSizes,
    coalesced_step,
    exchange_traffic,
    server_step,
    train_with_server_gradients,
)


class SharedServer(Server):
    """One server model; every exchange is one optimizer step, ∂L/∂z goes back."""

    def on_exchange(self, cid, z, y):
        loss, grad = server_step(self.model, self.opt, z, y, self.cfg.label_smoothing)
        return grad, loss

    def on_exchange_batch(self, requests):
        """Several exchanges, ONE step on all their samples (`coalesced_step`): each gets
        ∂(its own mean loss)/∂z at the weights before the step, and its loss."""
        zs, ys = [r[1] for r in requests], [r[2] for r in requests]
        _, grads, losses = coalesced_step(self.model, self.opt, zs, ys, self.cfg.label_smoothing)
        return list(zip(grads, losses, strict=True))


@ALGORITHMS.register("splitfed_v2")
class SplitFedV2(Algorithm):
    server_class = SharedServer
    stateless_server = True

    def train_round(self, client: Client, batches: Batches, server: ServerLink, t: int):
        return train_with_server_gradients(client, batches, server)

    def server_requests(self, t: int, batch_sizes: list[int]) -> int:
        return len(batch_sizes)  # one exchange per batch

    def planned_batch_traffic(self, t: int, batch_sizes: list[int], sizes: TrafficSizes):
        return exchange_traffic(batch_sizes, sizes, gradients=True)
