"""FedAvg (McMahan et al.): every client trains the whole model; the F-Server averages it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import Algorithm, Batches, Client, ComputeCosts, ServerLink, loss_fn


@ALGORITHMS.register("fedavg")
class FedAvg(Algorithm):
    server_class = None  # no S-Server: the "client model" is client ∘ server

    def client_modules(self) -> dict[str, nn.Module]:
        full = nn.Sequential(copy.deepcopy(self.split.client), copy.deepcopy(self.split.server))
        return {"client_model": full}

    def train_round(self, client: Client, batches: Batches, server: ServerLink, t: int):
        model, opt = client.parts["client_model"], client.optimizers["client_model"]
        losses = []
        for x, y in batches:
            loss = loss_fn(model(x), y, label_smoothing=self.cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def server_requests(self, t: int, batch_sizes: list[int]) -> int:
        return 0

    def planned_compute(self, t: int, batch_sizes: list[int], costs: ComputeCosts):
        return sum(batch_sizes) * (costs.client_model + costs.server_model), 0.0

    def eval_module(self, global_weights, server_model, device) -> nn.Module:
        model = self.client_modules()["client_model"].to(device)
        model.load_state_dict(global_weights["client_model"], strict=False)
        return model
