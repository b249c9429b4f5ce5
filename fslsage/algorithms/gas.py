"""GAS (Yang & Liu, AAAI 2025): Generative Activation-aided Asynchronous Split federated learning.

Clients have heterogeneous speeds (SPEC §6 profiles); an event loop in simulated time always
advances the client whose clock is smallest. One global iteration (a round here):
    client i, each step:  z = x_c,i(x); z up; the S-Server answers ∂L/∂z of the logit-adjusted
                          loss NLL(x_s(z) + log p_i(y), y) from its current model; z.backward; step
    S-Server:             (z, y) into the activation buffer; when it holds `activation_buffer`
                          batches: update label-wise Gaussians of the activations (running mean
                          and covariance), top every label up to `per_label` samples with
                          activations drawn from them, one server step on real + generated,
                          clear the buffer
    client i, after `local_iters` steps: its model up into the model buffer; a random idle client
                          starts from the latest global model in its place
    F-Server:             when the model buffer holds `model_buffer` models, average them into the
                          global client model: the global iteration ends
Optional: server learning rate η₀/√t in global iteration t (`server_lr_decay`).

The schedule depends only on the profiles and shard sizes, so it is planned ahead: the dry-run
plans the same events (`AsyncSchedule`), their ledger and their simulated time, and on Ray the
F-Server hands each client actor its clients' events while the S-Server (`server_batching:
exact`) answers the steps in the schedule's order, as the in-process event loop does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import (
    Algorithm,
    Batches,
    Client,
    ClientReport,
    Server,
    ServerLink,
    State,
    TrafficSizes,
    clone_state,
    exchange_traffic,
    loss_fn,
)
from fslsage.data import describe_dataset, local_batch_sizes
from fslsage.ledger import Ledger, state_bytes
from fslsage.models import communicated_state, cut_shape
from fslsage.simulation import RoundClock, traffic_totals
from fslsage.transport import RecordingLink, Send

# ----------------------------------------------------------------------------- the S-Server
# Above this many cut-layer features a full covariance per label is too big to keep and factor
# (alexnet_gas: 4096 features, 64 MiB and a 4096² Cholesky per label): `auto` keeps its diagonal.
FULL_COVARIANCE_MAX_DIM = 1024


class ActivationStats:
    """Label-wise running mean and covariance (or its diagonal) of flattened activations, merged
    batch by batch (Chan et al.'s parallel update), and samples drawn from those Gaussians. Every
    label is updated, and factored, at once: no loop over labels, no sync with the device."""

    def __init__(self, num_classes: int, dim: int, diagonal: bool, device: torch.device):
        self.diagonal = diagonal
        self.count = torch.zeros(num_classes, device=device)
        self.mean = torch.zeros(num_classes, dim, device=device)
        shape = (num_classes, dim) if diagonal else (num_classes, dim, dim)
        self.scatter = torch.zeros(shape, device=device)  # Σ (x − mean)(x − mean)ᵀ

    def update(self, z: Tensor, y: Tensor) -> None:
        onehot = F.one_hot(y, len(self.count)).to(z.dtype)  # (N, labels)
        m = onehot.sum(0)
        batch_mean = (onehot.T @ z) / m.clamp(min=1)[:, None]
        centred = z - batch_mean[y]
        if self.diagonal:
            batch_scatter = onehot.T @ centred.pow(2)
        else:  # per label: Σ over its rows of centred centredᵀ
            batch_scatter = (onehot.T[:, :, None] * centred[None]).transpose(1, 2) @ centred
        n, total = self.count, self.count + m
        share = m / total.clamp(min=1)  # m / (n + m); 0 for a label absent from the batch
        delta = batch_mean - self.mean
        self.mean += delta * share[:, None]
        spread = delta.pow(2) if self.diagonal else delta[:, :, None] * delta[:, None, :]
        weight = (n * share).view(-1, *[1] * (spread.dim() - 1))  # n m / (n + m)
        self.scatter += batch_scatter + spread * weight
        self.count = total

    def sample(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """n draws from label c's Gaussian."""
        return self.sample_labels([n if k == c else 0 for k in range(len(self.count))], generator)

    def sample_labels(self, counts: list[int], generator: torch.Generator) -> Tensor:
        """counts[c] draws from each label c's Gaussian, label after label (a small ridge keeps
        a thin covariance usable); the covariances are factored in one batched Cholesky."""
        labels = [c for c, k in enumerate(counts) if k > 0]
        dim, device = self.mean.shape[1], self.mean.device
        noise = torch.randn(sum(counts), dim, generator=generator, device=device)
        if not labels:
            return noise
        cov = self.scatter[labels] / (self.count[labels] - 1).clamp(min=1).view(
            -1, *[1] * (self.scatter.dim() - 1)
        )
        if self.diagonal:
            factor = (cov + 1e-6).sqrt()
        else:
            factor = torch.linalg.cholesky(cov + 1e-4 * torch.eye(dim, device=device))
        out, start = [], 0
        for i, c in enumerate(labels):
            part = noise[start : start + counts[c]]
            start += counts[c]
            spread = part * factor[i] if self.diagonal else part @ factor[i].T
            out.append(self.mean[c] + spread)
        return torch.cat(out)


class GenerativeServer(Server):
    """Answers each exchange from its current model and learns from buffered real activations
    topped up with generated ones."""

    def __init__(self, model, cfg, num_clients, num_classes: int, cut: tuple[int, ...]):
        super().__init__(model, cfg, num_clients)
        device = next(model.parameters()).device
        self.cut, self.num_classes = cut, num_classes
        dim = math.prod(cut)
        diagonal = cfg.activation_covariance == "diag" or (
            cfg.activation_covariance == "auto" and dim > FULL_COVARIANCE_MAX_DIM
        )
        self.stats = ActivationStats(num_classes, dim, diagonal, device)
        self.log_prior = torch.zeros(num_clients, num_classes, device=device)  # uniform
        self.buffer: list[tuple[Tensor, Tensor]] = []
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 4099)

    def set_label_counts(self, counts: np.ndarray) -> None:
        """Each client's label histogram, shared once at the start: its prior p_i(y)."""
        counts = torch.tensor(counts, dtype=torch.float32, device=self.log_prior.device)
        self.log_prior = (counts / counts.sum(1, keepdim=True)).clamp(min=1e-8).log()

    def on_exchange(self, cid, z, y):
        z_leaf = z.detach().requires_grad_(True)
        loss = loss_fn(self.model(z_leaf) + self.log_prior[cid], y)  # logit adjustment
        (grad,) = torch.autograd.grad(loss, z_leaf)  # the server's weights do not move here
        self.buffer.append((z.detach(), y))
        if len(self.buffer) == self.cfg.activation_buffer:
            self.step_on_buffer()
        return grad, loss.detach()

    def step_on_buffer(self) -> None:
        z = torch.cat([b[0] for b in self.buffer]).flatten(1)
        y = torch.cat([b[1] for b in self.buffer])
        self.buffer = []
        self.stats.update(z, y)
        per_label = self.cfg.per_label or self.cfg.batch_size
        have = torch.bincount(y, minlength=self.num_classes)
        ready = self.stats.count >= 2  # a Gaussian needs two samples
        missing = ((per_label - have).clamp(min=0) * ready).tolist()  # the step's one sync
        made = self.stats.sample_labels(missing, self.generator)
        labels = torch.arange(self.num_classes, device=y.device)
        made_y = labels.repeat_interleave(torch.tensor(missing, device=y.device)).to(y.dtype)
        z_all = torch.cat([z, made]).view(-1, *self.cut)
        loss = loss_fn(self.model(z_all), torch.cat([y, made_y]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.log("server_loss", loss.detach())
        self.log("generated", sum(missing))

    def begin_round(self, t: int) -> None:
        if self.cfg.server_lr_decay:
            self.decay_lr(t)

    def decay_lr(self, t: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr / math.sqrt(t)


# ----------------------------------------------------------------------------- simulated time
Event = tuple[str, int, int]  # (kind, client id, batch size of a step)


class AsyncSchedule:
    """Who acts next, in simulated time: events (kind, client, batch size): "start" (a client
    fetches the global model), "step" (one local step), "finish" (it uploads its model).
    Depends only on the profiles and sizes (not on training), so the dry-run plans the same
    events as a run.

    `durations(cid, event, batch)` gives an event's simulated seconds on client cid."""

    def __init__(self, cfg, client_samples: list[int],
                 durations: Callable[[int, str, int], float]):  # fmt: skip
        self.cfg, self.durations = cfg, durations
        self.rng = np.random.default_rng([cfg.seed, 2025])
        n = cfg.num_clients
        k = cfg.active_clients or n
        self.active = sorted(self.rng.choice(n, size=k, replace=False).tolist())
        self.clock = [0.0] * n
        self.steps_done = [0] * n  # in the current activation
        self.batch_index = [0] * n  # over the client's whole life: its data stream
        self.batch_sizes = [local_batch_sizes(s, cfg.batch_size, 1) for s in client_samples]
        self.starting = list(self.active)
        self.now = 0.0

    def global_iteration(self) -> Iterator[Event]:
        cfg, finished = self.cfg, 0
        while True:
            while self.starting:
                cid = self.starting.pop(0)
                self.clock[cid] += self.durations(cid, "start", 0)
                yield "start", cid, 0
            cid = min(self.active, key=lambda c: (self.clock[c], c))
            sizes = self.batch_sizes[cid]
            batch = sizes[self.batch_index[cid] % len(sizes)]
            self.clock[cid] += self.durations(cid, "step", batch)
            self.batch_index[cid] += 1
            self.steps_done[cid] += 1
            yield "step", cid, batch
            if self.steps_done[cid] == cfg.local_iters:
                self.clock[cid] += self.durations(cid, "finish", 0)
                self.now = self.clock[cid]
                yield "finish", cid, 0
                self.steps_done[cid] = 0
                self.active.remove(cid)
                idle = sorted(set(range(cfg.num_clients)) - set(self.active))
                nxt = int(self.rng.choice(idle))
                self.clock[nxt] = self.now  # it starts when the finished client hands over
                self.active.append(nxt)
                self.starting.append(nxt)
                finished += 1
                if finished == cfg.model_buffer:
                    return


def event_seconds(clock: RoundClock) -> Callable[[int, str, int], float]:
    """An event's simulated seconds on client cid: its transfers (`planned_event_traffic`) on
    the client's profile, and for a step the client's and the S-Server's compute of the batch."""
    costs = clock.costs

    def seconds(cid: int, event: str, batch: int) -> float:
        transfers = clock.algo.planned_event_traffic(event, batch, clock.sizes)
        server = batch * costs.server_model / clock.server_flops
        return clock.profiles[cid].seconds(batch * costs.client_model,
                                           *traffic_totals(transfers)) + server  # fmt: skip

    return seconds


# ----------------------------------------------------------------------------- the algorithm
@ALGORITHMS.register("gas")
class GAS(Algorithm):
    asynchronous = True  # runs `global_iteration`s on an AsyncSchedule instead of rounds

    def new_server(self, device):
        info = describe_dataset(self.cfg.dataset, **self.cfg.dataset_args)
        model = copy.deepcopy(self.split.server).to(device)
        return GenerativeServer(model, self.cfg, self.cfg.num_clients, info.num_classes,
                                cut_shape(self.split, info))  # fmt: skip

    def client_step(self, client: Client, x: Tensor, y: Tensor, server: ServerLink) -> Tensor:
        """One local step: the S-Server's gradient for z, back through the client model."""
        net, opt = client.parts["client_model"], client.optimizers["client_model"]
        z = net(x)
        grad, loss = server.exchange(z.detach(), y)
        opt.zero_grad(set_to_none=True)
        z.backward(grad)
        opt.step()
        return loss

    def global_iteration(
        self,
        t: int,
        events: Iterator[Event],
        clients: list[Client],
        streams: list[Iterator[tuple[Tensor, Tensor]]],
        global_weights: dict[str, State],
        send: Send,
        ledger: Ledger,
    ) -> tuple[dict[str, State], Tensor]:
        """Run one global iteration's events (the S-Server has begun round t); returns the new
        global weights and the mean training loss of its steps. `streams[i]` is client i's
        endless minibatch stream."""
        model_buffer: list[ClientReport] = []
        losses = []
        for event, cid, _batch in events:
            link = RecordingLink(cid, t, ledger, send)
            out = self.on_event(t, event, clients[cid], streams[cid], global_weights, link, ledger)
            if isinstance(out, ClientReport):
                model_buffer.append(out)
            elif out is not None:
                losses.append(out)
        return self.aggregate(model_buffer), torch.stack(losses).mean()

    def on_event(
        self,
        t: int,
        event: str,
        client: Client,
        stream: Iterator[tuple[Tensor, Tensor]],
        global_weights: dict[str, State],
        server: ServerLink,
        ledger: Ledger,
    ) -> Tensor | ClientReport | None:
        """One schedule event of `client`: "start" loads the global model (None), "step" takes
        one local step (its loss), "finish" hands its model to the model buffer (its report).
        Client actors on Ray run their clients' events with this too."""
        net = client.parts["client_model"]
        if event == "start":  # the latest global model comes down
            net.load_state_dict(global_weights["client_model"], strict=False)
            ledger.record(t, client.cid, "client_model", "down",
                          state_bytes(global_weights["client_model"]))  # fmt: skip
            return None
        if event == "step":
            x, y = next(stream)
            return self.client_step(client, x, y, server)
        state = clone_state(communicated_state(net))  # finish: the model goes up
        ledger.record(t, client.cid, "client_model", "up", state_bytes(state))
        return ClientReport(client.cid, client.num_samples, {"client_model": state}, 0.0)

    def train_round(self, client: Client, batches: Batches, server: ServerLink, t: int):
        raise TypeError("gas runs global iterations (global_iteration), not synchronous rounds")

    def planned_traffic(self, t, batch_sizes, sizes, received=None):
        raise TypeError("gas plans its traffic from its AsyncSchedule (see fslsage.dryrun)")

    def planned_event_traffic(self, event: str, batch: int, sizes: TrafficSizes):
        """The transfers of one schedule event (the dry-run's ledger)."""
        if event == "start":
            return [("client_model", "down", sizes.part_bytes["client_model"])]
        if event == "finish":
            return [("client_model", "up", sizes.part_bytes["client_model"])]
        return exchange_traffic([batch], sizes, gradients=True)
