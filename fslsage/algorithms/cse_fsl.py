"""CSE-FSL (Mu & Shen, 2023): clients learn from a LOCAL loss through an auxiliary head; every
q-th local iteration the smashed data (with labels) goes up and the shared server takes one step
on it. No gradient ever comes back. Client and aux models are averaged each round."""

from __future__ import annotations

import torch

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import (
    Algorithm,
    Batches,
    Client,
    ComputeCosts,
    Server,
    ServerLink,
    TrafficSizes,
    coalesced_step,
    exchange_traffic,
    loss_fn,
    server_step,
    upload_count,
    uploads,
)


class UploadServer(Server):
    """One shared server model that takes one optimizer step per upload; answers nothing."""

    def on_upload(self, cid, z, y):
        loss, _ = server_step(self.model, self.opt, z, y, self.cfg.label_smoothing)
        self.log("server_loss", loss)

    def on_upload_batch(self, requests):
        """Several uploads, ONE step on all their samples (`coalesced_step`); answers nothing."""
        zs, ys = [r[1] for r in requests], [r[2] for r in requests]
        loss, _, _ = coalesced_step(self.model, self.opt, zs, ys, self.cfg.label_smoothing)
        self.log("server_loss", loss)
        return [None] * len(requests)


@ALGORITHMS.register("cse_fsl")
class CSEFSL(Algorithm):
    uses_aux = True
    federated_parts = ("client_model", "aux_model")
    server_class = UploadServer

    def train_round(self, client: Client, batches: Batches, server: ServerLink, t: int):
        net, aux = client.parts["client_model"], client.parts["aux_model"]
        opt, aux_opt = client.optimizers["client_model"], client.optimizers["aux_model"]
        q = self.cfg.server_update_interval
        losses = []
        for k, (x, y) in enumerate(batches):
            z = net(x)
            if k % q == 0:
                server.upload(z.detach(), y)
            # the local loss trains both aux and client
            loss = loss_fn(aux(z), y, label_smoothing=self.cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            aux_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            aux_opt.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def server_requests(self, t: int, batch_sizes: list[int]) -> int:
        return upload_count(batch_sizes, self.cfg.server_update_interval)

    def planned_batch_traffic(self, t: int, batch_sizes: list[int], sizes: TrafficSizes):
        return exchange_traffic(uploads(batch_sizes, self.cfg.server_update_interval), sizes,
                                gradients=False)  # fmt: skip

    def planned_compute(self, t: int, batch_sizes: list[int], costs: ComputeCosts):
        uploaded = sum(uploads(batch_sizes, self.cfg.server_update_interval))
        return sum(batch_sizes) * (costs.client_model + costs.aux_model), (
            uploaded * costs.server_model
        )
