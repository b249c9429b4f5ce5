"""FSL-SAGE (Nair et al., ICML 2025): Federated Split Learning via Smashed Activation Gradient
Estimation.

Client i, round t = 1, 2, … (Algorithm 1):
    for each local iteration k:
        z = x_c,i(x)
        if k % q == 0: upload (z, y)                         # no answer comes back
        if k == 0 and (t − 1) % l == 0:                      # the first round, every l-th after
            receive the aligned auxiliary model x_a,i from the S-Server
        ĝ = ∂ NLL(x_a,i(z), y) / ∂z                          # estimated cut-layer gradient
        z.backward(ĝ); step x_c,i                             # the client never uses a local loss
S-Server (Algorithm 3, lazy):
    on upload (z, y) from i: one step of x_s on it; append (z, y) to i's FIFO alignment buffer
    align i: g = ∂ NLL(x_s(z), y) / ∂z on the buffer with the current x_s, then train the S-Server's
             copy of x_a,i for align_epochs to minimise Σ ‖ĝ − g‖², and send it down
F-Server (Algorithm 2): average client models. Auxiliary models are per client, never averaged.
Warm start (optional): round 0 is one round of CSE-FSL; its averaged aux model goes down to every
client with round 1's global model, and the S-Server's copies start from it too.

As in the authors' code (github srijith1996/FSL-SAGE), which counts rounds from 0 and aligns
when t % l == 0: a client aligns in its first round, after its first upload and the server's
step on it (the buffer holds that batch), so it never trains against a random aux head.

Both ĝ and g are per-sample gradients here (sum reduction), so their scale does not depend on
the batch size (the reference's targets scale with 1/buffer and its estimates with 1/batch,
which agree only when the two are equal); the client's step uses ĝ of the batch-mean loss like
every other algorithm. The targets are computed with the server in train mode by default, as the
reference does (BN normalises over the buffer and updates its running statistics);
`align_target_mode: eval` uses the running statistics and changes nothing.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import (
    Algorithm,
    Batches,
    Client,
    ComputeCosts,
    ServerLink,
    TrafficSizes,
    aux_optimizer,
    clone_state,
    cut_gradient,
    exchange_traffic,
    first_round,
    loss_fn,
    upload_count,
    uploads,
)
from fslsage.algorithms.cse_fsl import UploadServer
from fslsage.memory import ClientStates, offloads_client_state
from fslsage.models import communicated_state
from fslsage.progress import report_phase


def aligns(cfg, t: int) -> bool:
    """Whether round t aligns: `first_align_round` and every l-th after it. By default the
    first FSL-SAGE round (round 1; round 0 is a warm start's cse_fsl round), as the
    reference's t % l == 0 counting from 0."""
    start = cfg.first_align_round
    return t >= start and (t - start) % cfg.align_interval == 0


def true_cut_gradient(server_model: torch.nn.Module, z: Tensor, y: Tensor, cfg) -> Tensor:
    """Per-sample ∂ L(x_s(z), y) / ∂z (the training loss, `label_smoothing` included) with the
    server in `align_target_mode`: "train" (BN over these samples, its running statistics
    updated) or "eval" (no side effects)."""
    was_training = server_model.training
    server_model.train(cfg.align_target_mode == "train")
    try:
        return cut_gradient(server_model, z, y, "sum", label_smoothing=cfg.label_smoothing)
    finally:
        server_model.train(was_training)


class FifoBuffer:
    """Keeps the most recent `capacity` samples of aligned tensors (z, y[, g])."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.tensors: tuple[Tensor, ...] = ()

    def append(self, *tensors: Tensor) -> None:
        if self.tensors:
            tensors = tuple(
                torch.cat([old, new]) for old, new in zip(self.tensors, tensors, strict=True)
            )
        self.tensors = tuple(t[-self.capacity :] for t in tensors)

    def __len__(self) -> int:
        return len(self.tensors[0]) if self.tensors else 0


class AuxState(NamedTuple):
    """What the S-Server keeps for one client: its copy of the client's aux model, that copy's
    optimizer and the FIFO of the client's uploads."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    buffer: FifoBuffer


class AligningServer(UploadServer):
    """The S-Server of FSL-SAGE: steps on uploads, buffers them, aligns auxiliary models."""

    def __init__(self, model, cfg, num_clients, aux_init: torch.nn.Module):
        super().__init__(model, cfg, num_clients)
        device = next(model.parameters()).device
        # client i's state, on the device only while i is served when offloading
        self.aux = ClientStates([self.new_state(aux_init) for _ in range(num_clients)], device,
                                offloads_client_state(cfg, device))  # fmt: skip
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 7919)

    def new_state(self, aux_init: torch.nn.Module) -> AuxState:
        aux = copy.deepcopy(aux_init).cpu()
        return AuxState(aux, aux_optimizer(aux, self.cfg), FifoBuffer(self.cfg.align_buffer_size))

    def on_upload(self, cid, z, y):
        self.keep_upload(cid, z, y)
        super().on_upload(cid, z, y)

    def on_upload_batch(self, requests):
        """Every upload into its client's buffer, then the shared step on all of them."""
        for cid, z, y in requests:
            self.keep_upload(cid, z, y)
        return super().on_upload_batch(requests)

    def keep_upload(self, cid, z, y):
        """The upload goes into client cid's alignment buffer (eager: with its target, from
        the server the upload met)."""
        buffer = self.aux[cid].buffer
        if self.cfg.align_targets == "eager":
            buffer.append(z, y, true_cut_gradient(self.model, z, y, self.cfg))
        else:
            buffer.append(z, y)

    def start_from(self, global_weights):
        """After the warm start every client holds the averaged aux model: so do our copies."""
        for state in self.aux.stored():
            state.model.load_state_dict(global_weights["aux_model"], strict=False)

    def on_align(self, cid):
        aux, opt, buffer = self.aux[cid]
        if len(buffer) > 0:
            z, y, *stored = buffer.tensors
            g = stored[0] if stored else true_cut_gradient(self.model, z, y, self.cfg)
            first, last = self.align(aux, opt, z, y, g)
            self.log("align_loss_before", first)
            self.log("align_loss", last)
        return clone_state(communicated_state(aux))

    def align(self, aux, opt, z: Tensor, y: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Fit aux so its cut-layer gradient matches the server's: min Σ ‖ĝ − g‖².
        Returns the mean loss of the first and of the last epoch, as tensors on the device (no
        sync with it per batch)."""
        aux.train()
        first = last = torch.zeros((), device=z.device)
        for epoch in range(self.cfg.align_epochs):
            order = torch.randperm(len(z), generator=self.generator, device=z.device)
            total = torch.zeros((), dtype=torch.float64, device=z.device)
            for idx in order.split(self.cfg.align_batch_size):
                g_hat = cut_gradient(aux, z[idx], y[idx], "sum", create_graph=True,
                                     label_smoothing=self.cfg.label_smoothing)  # fmt: skip
                loss = (g_hat - g[idx]).pow(2).flatten(1).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            last = total / len(z)
            first = last if epoch == 0 else first
            report_phase(f"aligning an aux model: epoch {epoch + 1}/{self.cfg.align_epochs}")
        return first, last


@ALGORITHMS.register("fsl_sage")
class FSLSAGE(Algorithm):
    uses_aux = True
    federated_parts = ("client_model",)  # aux models stay per client
    metric_columns = ("align_loss",)  # the last alignment epoch's loss (NaN: no alignment)

    def new_server(self, device):
        server = copy.deepcopy(self.split.server).to(device)
        return AligningServer(server, self.cfg, self.cfg.num_clients, self.split.aux)

    def train_round(self, client: Client, batches: Batches, server: ServerLink, t: int):
        net, aux = client.parts["client_model"], client.parts["aux_model"]
        opt = client.optimizers["client_model"]
        q, aligning = self.cfg.server_update_interval, aligns(self.cfg, t)
        losses = []
        for k, (x, y) in enumerate(batches):
            z = net(x)
            if k % q == 0:
                server.upload(z.detach(), y)
            if k == 0 and aligning:  # after the first upload and the server's step on it
                aux.load_state_dict(server.aligned_aux(), strict=False)
            z_leaf = z.detach().requires_grad_(True)
            aux_loss = loss_fn(aux(z_leaf), y, label_smoothing=self.cfg.label_smoothing)
            (g_hat,) = torch.autograd.grad(aux_loss, z_leaf)  # the estimate of ∂L/∂z
            opt.zero_grad(set_to_none=True)
            z.backward(g_hat)
            opt.step()
            losses.append(aux_loss.detach())
        return torch.stack(losses).mean()

    def server_requests(self, t: int, batch_sizes: list[int]) -> int:
        return upload_count(batch_sizes, self.cfg.server_update_interval) + aligns(self.cfg, t)

    def planned_batch_traffic(self, t: int, batch_sizes: list[int], sizes: TrafficSizes):
        out = exchange_traffic(uploads(batch_sizes, self.cfg.server_update_interval), sizes,
                               gradients=False)  # fmt: skip
        if aligns(self.cfg, t):
            out.append(("aux_model", "down", sizes.part_bytes["aux_model"]))
        return out

    def planned_compute(self, t: int, batch_sizes: list[int], costs: ComputeCosts):
        """The client: its model and ĝ through aux per sample. The S-Server: a step per uploaded
        sample, one target per sample (eager: at upload; lazy: for the buffer at alignment),
        and alignment epochs whose double backward costs about two aux passes per sample."""
        cfg = self.cfg
        uploaded = sum(uploads(batch_sizes, cfg.server_update_interval))
        client = sum(batch_sizes) * (costs.client_model + costs.aux_model)
        server = uploaded * costs.server_model
        if cfg.align_targets == "eager":
            server += uploaded * costs.server_model
        if aligns(cfg, t):
            # after round t's first upload: the FIFO holds the earlier rounds' uploads (a warm
            # start's round 0 included) and that first batch
            earlier = t - first_round(cfg)
            buffered = min(cfg.align_buffer_size, earlier * uploaded + batch_sizes[0])
            if cfg.align_targets == "lazy":
                server += buffered * costs.server_model
            server += cfg.align_epochs * buffered * 2 * costs.aux_model
        return client, server
