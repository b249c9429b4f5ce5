"""GAS (Yang & Liu, AAAI 2025): Generative Activation-aided Asynchronous Split federated learning.

Clients have heterogeneous speeds (SPEC §6 profiles); an event loop in simulated time always
advances the client whose activations reach the S-Server first. One global iteration (a round
here):
    client i, each step:  z = x_c,i(x); z up; the S-Server answers ∂L/∂z of the logit-adjusted
                          loss NLL(x_s(z) + log p_i(y), y) from its current model; z.backward; step
    S-Server:             (z, y) into the activation buffer; when it holds `activation_buffer`
                          batches: update label-wise Gaussians of the activations (running mean
                          and covariance, each activation weighted by its client's progress),
                          once every label has one top every label up to `per_label` samples
                          with activations drawn from them, one server step on real + generated,
                          clear the buffer
    client i, after `local_iters` steps: its model up into the model buffer; a random idle client
                          (never itself) starts from the latest global model in its place
    F-Server:             when the model buffer holds `model_buffer` models, average them (plain
                          mean) into the global client model: the global iteration ends
Optional: server learning rate η₀/√t in global iteration t (`server_lr_decay`).

The schedule depends only on the profiles and shard sizes, so it is planned ahead: the dry-run
plans the same events (`AsyncSchedule`), their ledger and their simulated time, and on Ray the
F-Server hands each client actor its clients' events while the S-Server (`server_batching:
exact`) answers the steps in the schedule's order, as the in-process event loop does.

Read against the authors' code (github eejiarong/GAS: GAS_main.py, utils/utils.py,
utils/network.py); where they differ the authors' choice is the default, see README.md
"Fidelity to the authors' code".
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
    weighted_average,
)
from fslsage.data import describe_dataset, local_batch_sizes
from fslsage.ledger import Ledger, state_bytes
from fslsage.models import communicated_state, cut_shape
from fslsage.precision import full_precision
from fslsage.simulation import RoundClock, traffic_totals
from fslsage.transport import RecordingLink, Send

# ----------------------------------------------------------------------------- the S-Server
# Above this many cut-layer features a full covariance per label is big to keep and factor
# (alexnet_gas: 4096 features, 64 MiB and a 4096² Cholesky per label): `auto` keeps its diagonal.
# The authors' code keeps the full one (the GAS paper config sets `activation_covariance: full`).
FULL_COVARIANCE_MAX_DIM = 1024
# The authors' code (utils: IncrementalStats.update, try_multivariate_normal): 1e-5 on the
# covariance's diagonal at every merge after a label's first; a covariance that is not
# positive definite is sampled with 1e-6·I added, then 1e-5·I, ... (100 tries); the diagonal
# variant samples with standard deviation sqrt(var + 1e-5).
MERGE_RIDGE = 1e-5
PD_RETRY_START, PD_RETRY_FACTOR, PD_RETRY_TRIES = 1e-6, 10.0, 100


class ActivationStats:
    """Label-wise weighted running mean and covariance (or its diagonal) of flattened
    activations, as the authors' code keeps them: a buffer's label-wise weighted mean b and
    (biased) covariance B, of total weight m, merge into the running (mean, cov, weight W) with
    d = W / (W + m):
        mean ← d·mean + (1 − d)·b
        cov  ← d·(cov + (mean' − mean)(mean' − mean)ᵀ) + (1 − d)·(B + (mean' − b)(mean' − b)ᵀ)
               + 1e-5·I   (not at a label's first merge)
    (the weighted form of Chan et al.'s parallel update, plus the ridge). Every label is merged,
    and factored, at once: no loop over labels, no sync with the device while merging."""

    def __init__(self, num_classes: int, dim: int, diagonal: bool, device: torch.device):
        self.diagonal = diagonal
        self.weight = torch.zeros(num_classes, device=device)  # W: the weight merged so far
        self.mean = torch.zeros(num_classes, dim, device=device)
        shape = (num_classes, dim) if diagonal else (num_classes, dim, dim)
        self.cov = torch.zeros(shape, device=device)

    def update(self, z: Tensor, y: Tensor, w: Tensor | None = None) -> None:
        """Merge rows z (N, dim) of labels y, row i weighing w[i] (default 1)."""
        onehot = F.one_hot(y, len(self.weight)).to(z.dtype)  # (N, labels)
        if w is not None:
            onehot = onehot * w.to(z.dtype)[:, None]
        m = onehot.sum(0)  # the batch's weight per label
        batch_mean = (onehot.T @ z) / m.clamp(min=1e-30)[:, None]
        centred = z - batch_mean[y]
        old, total = self.weight, self.weight + m
        if self.diagonal:
            scatter = onehot.T @ centred.pow(2)
        else:  # per label: Σ over its rows of w · centred centredᵀ
            scatter = (onehot.T[:, :, None] * centred[None]).transpose(1, 2) @ centred
        share = m / total.clamp(min=1e-30)  # 1 − d; 0 for a label absent from the batch
        keep = 1 - share  # d
        delta = batch_mean - self.mean
        self.mean += delta * share[:, None]
        ridge = MERGE_RIDGE * ((m > 0) & (old > 0)).to(z.dtype)
        # (1 − d)·B = scatter / (W + m); the two spreads add up to d(1 − d)·δδᵀ
        cross = keep * share
        if self.diagonal:
            self.cov.mul_(keep[:, None]).add_(scatter / total.clamp(min=1e-30)[:, None])
            self.cov.add_(delta.pow(2) * cross[:, None] + ridge[:, None])
        else:
            self.cov.mul_(keep[:, None, None])
            self.cov.add_(scatter.div_(total.clamp(min=1e-30)[:, None, None]))
            self.cov.baddbmm_(delta[:, :, None], (delta * cross[:, None])[:, None, :])
            self.cov.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        self.weight = total

    def sample(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """n draws from label c's Gaussian."""
        return self.sample_labels([n if k == c else 0 for k in range(len(self.weight))], generator)

    def factors(self, labels: list[int]) -> Tensor:
        """The labels' covariance factors, L with L Lᵀ = cov (full; one batched Cholesky) or the
        standard deviations (diagonal). A covariance that is not positive definite is factored
        again with ε·I added, ε = 1e-6, 1e-5, ... as the authors' code retries: one sync to see
        which failed, and one per retry."""
        cov = self.cov[labels]
        if self.diagonal:
            return (cov + MERGE_RIDGE).sqrt()
        factor, info = torch.linalg.cholesky_ex(cov)
        failed = torch.nonzero(info).flatten()
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        eps = PD_RETRY_START
        for _ in range(PD_RETRY_TRIES):
            if len(failed) == 0:
                return factor
            retry, info = torch.linalg.cholesky_ex(cov[failed] + eps * eye)
            factor[failed] = retry
            failed = failed[info != 0]
            eps *= PD_RETRY_FACTOR
        if len(failed) == 0:
            return factor
        bad = [labels[i] for i in failed.tolist()]
        raise ValueError(f"the covariance of labels {bad} is not positive definite even with "
                         f"{eps / PD_RETRY_FACTOR:g}·I added")  # fmt: skip

    def sample_labels(self, counts: list[int], generator: torch.Generator) -> Tensor:
        """counts[c] draws from each label c's Gaussian, label after label; the covariances are
        factored together (`factors`)."""
        labels = [c for c, k in enumerate(counts) if k > 0]
        dim, device = self.mean.shape[1], self.mean.device
        noise = torch.randn(sum(counts), dim, generator=generator, device=device)
        if not labels:
            return noise
        factor = self.factors(labels)
        out, start = [], 0
        for i, c in enumerate(labels):
            part = noise[start : start + counts[c]]
            start += counts[c]
            spread = part * factor[i] if self.diagonal else part @ factor[i].T
            out.append(self.mean[c] + spread)
        return torch.cat(out)


class Rotation:
    """Who trains (the authors' `replace_user`): `active_clients` clients drawn at random train
    at once; a client that finishes is replaced by a random idle client, never by itself
    (unless every client is active: then it starts again). Seeded by the config, so the
    S-Server follows the schedule's rotation by replaying the same finishes."""

    def __init__(self, cfg):
        self.rng = np.random.default_rng([cfg.seed, 2025])
        self.num_clients = n = cfg.num_clients
        self.active: list[int] = sorted(
            self.rng.choice(n, size=cfg.active_clients or n, replace=False).tolist()
        )

    def replace(self, cid: int) -> int:
        """Client cid has finished: the client that takes its place."""
        busy = {*self.active, cid}
        idle = [c for c in range(self.num_clients) if c not in busy]
        nxt = int(self.rng.choice(idle)) if idle else cid
        self.active = [nxt if c == cid else c for c in self.active]
        return nxt


class GenerativeServer(Server):
    """Answers each exchange from its current model and learns from buffered real activations
    topped up with generated ones.

    `activation_weighting: progress` (the authors' code) weighs each activation in the label
    statistics by its client's progress count: a client's count goes up by one with each of its
    steps, and a client that starts takes the run's base count, which grows by the number of
    server steps so far at the end of every global iteration; every count starts at 1. The
    S-Server keeps the counts itself: it sees each client's steps, knows a client has finished
    after `local_iters` of them, and replays the schedule's `Rotation` to know who starts in
    its place (exact while it serves the steps in the schedule's order, as `server_batching:
    exact` does). `count`: every activation weighs 1."""

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
        self.buffer: list[tuple[Tensor, Tensor, float]] = []  # (z, y, weight of its rows)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 4099)
        # the progress counts (see the class docstring), on the host: no sync
        self.rotation = Rotation(cfg)
        self.progress = [1] * cfg.num_clients  # the weight of each client's next activations
        self.steps = [0] * cfg.num_clients  # each client's steps since it started
        self.finished = 0  # clients finished in this global iteration
        self.server_steps = 0
        self.base_progress = 1  # a starting client's count

    def set_label_counts(self, counts: np.ndarray) -> None:
        """Each client's label histogram, shared once at the start: its prior p_i(y)."""
        counts = torch.tensor(counts, dtype=torch.float32, device=self.log_prior.device)
        self.log_prior = (counts / counts.sum(1, keepdim=True)).clamp(min=1e-8).log()

    def on_exchange(self, cid, z, y):
        z_leaf = z.detach().requires_grad_(True)
        smoothing = self.cfg.label_smoothing
        loss = loss_fn(self.model(z_leaf) + self.log_prior[cid], y, label_smoothing=smoothing)
        (grad,) = torch.autograd.grad(loss, z_leaf)  # the server's weights do not move here
        weight = 1.0 if self.cfg.activation_weighting == "count" else float(self.progress[cid])
        self.buffer.append((z.detach(), y, weight))
        if len(self.buffer) == self.cfg.activation_buffer:
            self.step_on_buffer()
        self.count_step(cid)
        return grad, loss.detach()

    def count_step(self, cid: int) -> None:
        """Client cid's step is served: its progress count goes up; after its `local_iters`-th
        step it has finished, the global iteration ends with the `model_buffer`-th finish (the
        base count grows by the server steps so far), and its replacement takes the base."""
        self.progress[cid] += 1
        self.steps[cid] += 1
        if self.steps[cid] < self.cfg.local_iters:
            return
        self.steps[cid] = 0
        self.finished += 1
        if self.finished == self.cfg.model_buffer:
            self.finished = 0
            self.base_progress += self.server_steps
        self.progress[self.rotation.replace(cid)] = self.base_progress

    def step_on_buffer(self) -> None:
        z = torch.cat([b[0] for b in self.buffer]).flatten(1)
        y = torch.cat([b[1] for b in self.buffer])
        w = torch.cat([torch.full(b[1].shape, b[2], device=z.device) for b in self.buffer])
        self.buffer = []
        self.server_steps += 1
        per_label = self.cfg.per_label or self.cfg.batch_size
        have = torch.bincount(y, minlength=self.num_classes)
        with full_precision(z.device):  # covariances and Cholesky factors: never in bf16
            self.stats.update(z.float(), y, w)
            # as the authors' code: generated activations only once every label has statistics
            ready = (self.stats.weight > 0).all()
            # the step's one sync (and, where activations are drawn, one in `factors`)
            missing = ((per_label - have).clamp(min=0) * ready).tolist()
            made = self.stats.sample_labels(missing, self.generator)
        labels = torch.arange(self.num_classes, device=y.device)
        made_y = labels.repeat_interleave(torch.tensor(missing, device=y.device)).to(y.dtype)
        z_all = torch.cat([z, made]).view(-1, *self.cut)
        loss = loss_fn(self.model(z_all), torch.cat([y, made_y]),
                       label_smoothing=self.cfg.label_smoothing)  # fmt: skip
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.log("server_loss", loss.detach())
        self.log("generated", sum(missing))

    def begin_round(self, t: int) -> None:
        super().begin_round(t)
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

    As in the authors' code, the next step is the one whose activations reach the S-Server
    first: a client's clock (when its previous step, or its start, is done) plus the forward
    pass and upload of its next batch (`durations(cid, "arrive", batch)`); ties go by client
    id. A step then takes the client's whole step time (`durations(cid, "step", batch)`), a
    finish its model upload, a start its model download; a replacement (`Rotation`) starts
    when the finished client's upload is done.

    `durations(cid, event, batch)` gives an event's simulated seconds on client cid."""

    def __init__(self, cfg, client_samples: list[int],
                 durations: Callable[[int, str, int], float]):  # fmt: skip
        self.cfg, self.durations = cfg, durations
        self.rotation = Rotation(cfg)
        n = cfg.num_clients
        self.clock = [0.0] * n
        self.arrival = [0.0] * n  # when each active client's next activations arrive
        self.steps_done = [0] * n  # in the current activation
        self.batch_index = [0] * n  # over the client's whole life: its data stream
        self.batch_sizes = [local_batch_sizes(s, cfg.batch_size, 1) for s in client_samples]
        self.starting = list(self.active)
        self.now = 0.0

    @property
    def active(self) -> list[int]:
        return self.rotation.active

    def _next_batch(self, cid: int) -> int:
        sizes = self.batch_sizes[cid]
        return sizes[self.batch_index[cid] % len(sizes)]

    def _plan_arrival(self, cid: int) -> None:
        batch = self._next_batch(cid)
        self.arrival[cid] = self.clock[cid] + self.durations(cid, "arrive", batch)

    def global_iteration(self) -> Iterator[Event]:
        cfg, finished = self.cfg, 0
        while True:
            while self.starting:
                cid = self.starting.pop(0)
                self.clock[cid] += self.durations(cid, "start", 0)
                self._plan_arrival(cid)
                yield "start", cid, 0
            cid = min(self.active, key=lambda c: (self.arrival[c], c))
            batch = self._next_batch(cid)
            self.clock[cid] += self.durations(cid, "step", batch)
            self.batch_index[cid] += 1
            self.steps_done[cid] += 1
            self._plan_arrival(cid)
            yield "step", cid, batch
            if self.steps_done[cid] == cfg.local_iters:
                self.clock[cid] += self.durations(cid, "finish", 0)
                self.now = self.clock[cid]
                yield "finish", cid, 0
                self.steps_done[cid] = 0
                nxt = self.rotation.replace(cid)
                self.clock[nxt] = self.now  # it starts when the finished client hands over
                self.starting.append(nxt)
                finished += 1
                if finished == cfg.model_buffer:
                    return


# the forward pass's share of a training step's FLOPs (backward: about twice the forward)
FORWARD_SHARE = 1 / 3


def event_seconds(clock: RoundClock) -> Callable[[int, str, int], float]:
    """An event's simulated seconds on client cid: its transfers (`planned_event_traffic`) on
    the client's profile, and for a step the client's and the S-Server's compute of the batch.
    "arrive" (part of a step): the client's forward pass of the batch and the upload of its
    activations and labels, when they reach the S-Server."""
    costs = clock.costs

    def seconds(cid: int, event: str, batch: int) -> float:
        profile = clock.profiles[cid]
        if event == "arrive":
            sent = [t for t in clock.algo.planned_event_traffic("step", batch, clock.sizes)
                    if t[1] == "up"]  # fmt: skip
            return profile.seconds(FORWARD_SHARE * batch * costs.client_model,
                                   *traffic_totals(sent))  # fmt: skip
        transfers = clock.algo.planned_event_traffic(event, batch, clock.sizes)
        server = batch * costs.server_model / clock.server_flops
        return profile.seconds(batch * costs.client_model, *traffic_totals(transfers)) + server

    return seconds


# ----------------------------------------------------------------------------- the algorithm
@ALGORITHMS.register("gas")
class GAS(Algorithm):
    asynchronous = True  # runs `global_iteration`s on an AsyncSchedule instead of rounds
    needs_class_labels = True  # the logit adjustment's label priors
    network = "wireless"  # its paper's setting

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

    def aggregate(self, reports: list[ClientReport]) -> dict[str, State]:
        """F-Server: the model buffer's plain mean, as the authors' code averages it (each model
        1 / model_buffer): every client took `local_iters` steps, however much data it holds."""
        return {
            part: weighted_average([r.weights[part] for r in reports], [1.0] * len(reports))
            for part in self.federated_parts
        }

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
