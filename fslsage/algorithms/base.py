"""The roles every algorithm is written against (SPEC §1–§2).

An algorithm is three small pieces of maths:
  * `train_round(client, batches, server, t)` — what client *i* does in round *t*; it talks to the
    S-Server only through a `ServerLink` (upload / exchange / aligned_aux), so it never knows
    whether the server is an object in this process or a Ray actor;
  * its S-Server class (`Server`) — what the S-Server does with each request;
  * `aggregate(reports)` — what the F-Server does at round end.
Two declarations go with them: `planned_batch_traffic` (the dry-run ledger) and
`server_requests` (how many requests a client's round makes, so a runtime knows its last one).
Transport, byte accounting and scheduling live in `fslsage.transport` and the runtimes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fslsage.models import communicated_state
from fslsage.models.base import SplitModel

if TYPE_CHECKING:
    import numpy as np

    from fslsage.config import Config

State = dict[str, Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- maths shared by all
def loss_fn(
    logits: Tensor, y: Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> Tensor:
    """NLL of log-softmax (cross-entropy); works for (B, C) and language-model (B, T, V) logits.
    The mean is over labelled targets and is 0, not NaN, for a batch whose labels are all ignored
    (a language-model batch of prompts only). Training losses pass the config's
    `label_smoothing`; evaluation keeps the plain NLL."""
    flat_logits, flat_y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    kwargs = {"ignore_index": IGNORE_INDEX, "label_smoothing": label_smoothing}
    if reduction != "mean":
        return F.cross_entropy(flat_logits, flat_y, reduction=reduction, **kwargs)
    total = F.cross_entropy(flat_logits, flat_y, reduction="sum", **kwargs)
    return total / (flat_y != IGNORE_INDEX).sum().clamp(min=1)


def make_optimizer(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The optimizer of a client or server model: `optimizer`, `lr`, `weight_decay`,
    `momentum` (sgd) and `grad_clip`; its lr follows `lr_schedule` (`set_round_lr`)."""
    return _optimizer(module, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg)


def aux_optimizer(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """An auxiliary model's own optimizer, as in the reference code (Adam 1e-3, no weight decay
    by default): `aux_optimizer`, `aux_lr`, `aux_weight_decay`; `momentum` and `grad_clip` as
    every model's; a constant lr."""
    return _optimizer(module, cfg.aux_optimizer, cfg.aux_lr, cfg.aux_weight_decay, cfg)


def _optimizer(
    module: nn.Module, name: str, lr: float, wd: float, cfg: Config
) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    else:
        kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        opt = kind(params, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    if cfg.grad_clip > 0:
        # every step of this optimizer clips its model's gradient norm first (the GAS reference
        # clips client and server models at 10), so no algorithm needs to remember to
        def clip(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)

        opt.register_step_pre_hook(clip)
    return opt


def round_lr_factor(cfg: Config, t: int) -> float:
    """`lr_schedule` in round t: 1, or linear warm-up over `warmup_rounds` then linear decay
    that reaches 1 / (rounds − warmup_rounds) in the last round (it still trains). A warm start
    (round 0) trains at the first round's rate."""
    if cfg.lr_schedule == "constant":
        return 1.0
    t, warmup = max(t, 1), cfg.warmup_rounds
    decay = (cfg.rounds - t + 1) / (cfg.rounds - warmup)
    return min(t / warmup, decay) if warmup else decay


def set_round_lr(optimizers: Iterable[torch.optim.Optimizer], cfg: Config, t: int) -> None:
    """Round t's lr, `lr` × the schedule's factor, in optimizers made by `make_optimizer`."""
    lr = cfg.lr * round_lr_factor(cfg, t)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def cut_gradient(
    head: nn.Module, z: Tensor, y: Tensor, reduction: str = "mean", create_graph: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor:  # fmt: skip
    """∂ L(head(z), y) / ∂z — the true gradient when `head` is the server model, FSL-SAGE's
    estimate ĝ when it is the auxiliary model."""
    z = z.detach().requires_grad_(True)
    loss = loss_fn(head(z), y, reduction, label_smoothing)
    (grad,) = torch.autograd.grad(loss, z, create_graph=create_graph)
    return grad


def server_step(
    model: nn.Module, opt: torch.optim.Optimizer, z: Tensor, y: Tensor, label_smoothing: float = 0.0
):
    """One server optimizer step on smashed data; returns (loss, ∂L/∂z)."""
    z = z.detach().requires_grad_(True)
    loss = loss_fn(model(z), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), z.grad


def coalesced_step(
    model: nn.Module, opt: torch.optim.Optimizer, zs: list[Tensor], ys: list[Tensor],
    label_smoothing: float = 0.0,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:  # fmt: skip
    """One optimizer step on several requests at once (`server_batching: coalesce`). The step's
    loss is the mean over all their samples (exactly `server_step` on `torch.cat`); request i
    gets ∂(its own mean loss)/∂z_i — the shared gradient's slice rescaled by total/own sample
    count, at the weights before the step — and its own mean loss.
    Returns (step loss, per-request gradients, per-request losses)."""
    sizes = [len(z) for z in zs]
    z = torch.cat(zs).detach().requires_grad_(True)
    y = torch.cat(ys)
    per_sample = loss_fn(model(z), y, "none", label_smoothing).view(len(y), -1).sum(1)
    counts = [(yi != IGNORE_INDEX).sum() for yi in ys]  # labelled targets, as loss_fn's mean
    total = torch.stack(counts).sum().clamp(min=1)
    loss = per_sample.sum() / total
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    own = [c.clamp(min=1) for c in counts]
    grads = [g * (total / c) for g, c in zip(z.grad.split(sizes), own, strict=True)]
    losses = [p.sum() / c for p, c in zip(per_sample.detach().split(sizes), own, strict=True)]
    return loss.detach(), grads, losses


def train_with_server_gradients(client: Client, batches: Batches, server: ServerLink) -> Tensor:
    """Vanilla split learning on one client (sl, splitfed_v1, splitfed_v2): per batch, z goes up,
    the server steps and sends ∂L/∂z down, the client back-propagates it and steps."""
    net, opt = client.parts["client_model"], client.optimizers["client_model"]
    losses = []
    for x, y in batches:
        z = net(x)
        grad, loss = server.exchange(z.detach(), y)
        opt.zero_grad(set_to_none=True)
        z.backward(grad)
        opt.step()
        losses.append(loss)
    return torch.stack(losses).mean()


def weighted_average(states: list[Mapping[str, Tensor]], weights: list[float]) -> State:
    """Average whole state_dicts (BN buffers included) weighted by sample counts; float64
    accumulation so the result does not depend on the order clients arrive in."""
    total = float(sum(weights))
    out: State = {}
    for key, first in states[0].items():
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[key] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype)
    return out


# ----------------------------------------------------------------------------- roles
class ServerLink(Protocol):
    """A client's view of the S-Server. Each call is one network exchange (booked in the ledger)."""

    def upload(self, z: Tensor, y: Tensor) -> None:
        """Smashed data and labels go up; nothing comes back (cse_fsl, fsl_sage)."""

    def exchange(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Smashed data and labels go up; ∂L/∂z (and the scalar loss) come down."""

    def aligned_aux(self) -> State:
        """The S-Server aligns this client's auxiliary model and sends it down (fsl_sage)."""


@dataclass
class Client:
    """What client *i* keeps between rounds: its modules, their optimizers and its RNG."""

    cid: int
    parts: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    generator: torch.Generator
    num_samples: int


@dataclass
class ClientReport:
    """What a client hands the F-Server at round end."""

    cid: int
    num_samples: int
    weights: dict[str, State]  # federated parts, communicated tensors only
    train_loss: float
    ledger: list = field(default_factory=list)  # Ledger.entries() of this client's round


class Server:
    """S-Server base: one shared server model stepped on every request it learns from.

    A request of kind K ("upload", "exchange", "align") goes to `on_K(cid, *args)`. A server may
    also serve several requests of a kind at once (`server_batching: coalesce` on Ray):
    `on_K_batch(requests)` takes a list of (cid, *args) and returns one answer per request. A
    server without one is served one request at a time (`batch_handler`)."""

    # set by a server whose weights go out to stateless replicas after it steps (`published`)
    publishes: ClassVar[bool] = False

    def __init__(self, model: nn.Module, cfg: Config, num_clients: int):
        self.cfg, self.num_clients = cfg, num_clients
        self.model = model
        self.opt = make_optimizer(model, cfg)
        self.metrics: dict[str, list[float]] = {}

    def on_upload(self, cid: int, z: Tensor, y: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes no uploads")

    def on_exchange(self, cid: int, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} returns no gradients")

    def on_align(self, cid: int) -> State:
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary models")

    def batch_handler(self, kind: str) -> Callable[[list[tuple]], list] | None:
        """`on_<kind>_batch`, which serves a list of requests of `kind` at once, if the class
        that defines this server's `on_<kind>` defines it too (a subclass that changes the
        single handler without its batch twin is served one request at a time); else None."""
        single, batch = f"on_{kind}", f"on_{kind}_batch"
        owner = next((c for c in type(self).__mro__ if single in vars(c)), None)
        return getattr(self, batch) if owner is not None and batch in vars(owner) else None

    def set_label_counts(self, counts: np.ndarray) -> None:
        """The clients' label histograms (clients × classes), shared once as the run starts;
        only gas's logit adjustment uses them."""

    def begin_round(self, t: int) -> None:
        """Round t opens, before any of its requests: the server models take round t's lr
        (`lr_schedule`). A subclass that overrides this calls it first."""
        set_round_lr(self.scheduled_optimizers(), self.cfg, t)

    def scheduled_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of server models whose lr follows `lr_schedule` (not aux models')."""
        return [self.opt]

    def end_round(self, t: int) -> dict[str, float]:
        """Round-end work inside the S-Server; returns the round's server metrics (then reset)."""
        # the one sync of the round's metrics with the device (tensors logged on it)
        out = {k: float(torch.stack([torch.as_tensor(x).double().cpu() for x in v]).mean())
               for k, v in self.metrics.items() if v}  # fmt: skip
        self.metrics = {}
        return out

    def start_from(self, global_weights: dict[str, State]) -> None:
        """The F-Server hands over the global weights of the warm start (round 0) as round 1
        opens; a server that keeps copies of client parts takes them from here."""

    def eval_model(self) -> nn.Module:
        return self.model

    def log(self, name: str, value: float | Tensor) -> None:
        """A metric of one request, kept as given until `end_round` averages the round's: a
        tensor stays on its device, so a request never waits for the device to finish."""
        self.metrics.setdefault(name, []).append(
            value.detach() if torch.is_tensor(value) else value
        )


@dataclass(frozen=True)
class TrafficSizes:
    """Byte sizes the dry-run ledger is computed from (no data needed)."""

    activation_bytes: int  # one sample of z
    label_bytes: int  # one sample's labels
    part_bytes: dict[str, int]  # communicated bytes of each client part (client_model, aux_model)


@dataclass(frozen=True)
class ComputeCosts:
    """FLOPs of one sample's forward and backward pass through each part of the split model
    (the simulated clock of SPEC §6 is computed from them; no data needed)."""

    client_model: float
    server_model: float
    aux_model: float


Transfer = tuple[str, str, int]  # (kind, direction, bytes)


class Algorithm:
    """Base class: subclasses set the class attributes and write `train_round`."""

    name: ClassVar[str]
    federated_parts: ClassVar[tuple[str, ...]] = ("client_model",)  # broadcast, uploaded, averaged
    asynchronous: ClassVar[bool] = False  # gas: global iterations on a simulated-time schedule
    server_class: ClassVar[type[Server] | None] = Server
    uses_aux: ClassVar[bool] = False
    # one shared server model that answers with gradients: it can run as stateless replicas
    stateless_server: ClassVar[bool] = False
    # server metrics (`Server.log`) that get a column of their own in every round's row
    metric_columns: ClassVar[tuple[str, ...]] = ()
    # needs class labels (not a language model's tokens)
    needs_class_labels: ClassVar[bool] = False
    # the client network profile (fslsage.simulation) that `network: auto` means for it
    network: ClassVar[str] = "equal"

    def __init__(self, cfg: Config, split: SplitModel):
        self.cfg, self.split = cfg, split
        self._warm_start: Algorithm | None = None

    # -- the schedule of rounds ----------------------------------------------------------------
    def for_round(self, t: int) -> Algorithm:
        """The algorithm that runs round t. Round 0 is the warm start (SPEC §2): one round of
        cse_fsl, whose aggregate (client and aux models) the first round starts from."""
        if t != WARM_START_ROUND:
            return self
        if self._warm_start is None:
            from fslsage.algorithms.cse_fsl import CSEFSL

            self._warm_start = CSEFSL(self.cfg, self.split)
        return self._warm_start

    def hands_over(self, t: int) -> bool:
        """Whether the S-Server takes the global weights (`Server.start_from`) as round t opens:
        after the warm start, so FSL-SAGE's S-Server aligns from the warm aux model."""
        return self.cfg.warm_start and t == WARM_START_ROUND + 1

    def received_parts(self, t: int) -> tuple[str, ...]:
        """The parts of the global weights that every client downloads as round t opens: the
        previous round's aggregate (after the warm start, the aux model too), else the
        first round's initial weights."""
        previous = t - 1 if t > first_round(self.cfg) else t
        return self.for_round(previous).federated_parts

    # -- the client's modules ------------------------------------------------------------------
    def client_modules(self) -> dict[str, nn.Module]:
        """Fresh copies of the modules a client holds (the global initial weights)."""
        parts = {"client_model": copy.deepcopy(self.split.client)}
        if self.uses_aux:
            parts["aux_model"] = copy.deepcopy(self.split.aux)
        return parts

    def new_client(self, cid: int, num_samples: int, device: torch.device) -> Client:
        parts = {k: m.to(device) for k, m in self.client_modules().items()}
        return Client(
            cid=cid,
            parts=parts,
            optimizers={
                k: (aux_optimizer if k == "aux_model" else make_optimizer)(m, self.cfg)
                for k, m in parts.items()
            },
            generator=client_generator(self.cfg.seed, cid, device),
            num_samples=num_samples,
        )

    def new_server(self, device: torch.device) -> Server | None:
        if self.server_class is None:
            return None
        server_class = self.server_class
        if self.cfg.server_mode == "stateless":  # replicas and a reducer (fslsage.stateless)
            from fslsage.stateless import StatelessServer

            server_class = StatelessServer
        return server_class(copy.deepcopy(self.split.server).to(device), self.cfg,
                            self.cfg.num_clients)  # fmt: skip

    def initial_global(self) -> dict[str, State]:
        modules = self.client_modules()
        return {p: clone_state(communicated_state(modules[p])) for p in self.federated_parts}

    # -- the schedule of a synchronous round ------------------------------------------------------
    def round_stages(self, cids: list[int]) -> list[list[int]]:
        """The round's clients in stages, in id order. Every client of a stage starts from the
        same weights: in the first stage the global weights, in each later one the weights the
        previous stage's last client handed on. The runtimes run a stage's clients side by side
        (on Ray) and the stages one after another; the simulated clock adds up each stage's
        slowest client. Default: one stage, everyone from the global weights."""
        return [cids]

    # -- the maths ------------------------------------------------------------------------------
    def train_round(self, client: Client, batches: Batches, server: ServerLink, t: int) -> Tensor:
        """Client *i*'s work in round *t*; returns its mean training loss."""
        raise NotImplementedError

    def server_requests(self, t: int, batch_sizes: list[int]) -> int | None:
        """How many S-Server requests (uploads, exchanges, alignments) `train_round` makes in
        round *t* with these local-iteration batch sizes; None if that is not known ahead. The
        transport marks the last one, so the S-Server can turn to the next client as soon as it
        has served it, while this client finishes its round (a wrong count is an error)."""
        return None

    def aggregate(self, reports: list[ClientReport]) -> dict[str, State]:
        """F-Server: sample-weighted average of every federated part."""
        weights = [r.num_samples for r in reports]
        return {
            part: weighted_average([r.weights[part] for r in reports], weights)
            for part in self.federated_parts
        }

    def eval_module(
        self, global_weights: dict[str, State], server_model: nn.Module | None, device: torch.device
    ) -> nn.Module:
        """The global model the F-Server evaluates: global client model ∘ server model."""
        client = copy.deepcopy(self.split.client).to(device)
        client.load_state_dict(global_weights["client_model"], strict=False)
        return nn.Sequential(client, server_model)

    # -- the plan: communication (the paper's accounting) and compute; no data needed --------------
    def planned_traffic(
        self,
        t: int,
        batch_sizes: list[int],
        sizes: TrafficSizes,
        received: tuple[str, ...] | None = None,
    ) -> list[Transfer]:
        """Transfers of one client in round *t*, given its local-iteration batch sizes: the
        `received` global parts down (default: this algorithm's federated parts), its
        federated parts up, and the per-batch traffic."""
        out: list[Transfer] = [
            (part, "down", sizes.part_bytes[part])
            for part in (self.federated_parts if received is None else received)
        ]
        out += [(part, "up", sizes.part_bytes[part]) for part in self.federated_parts]
        return out + self.planned_batch_traffic(t, batch_sizes, sizes)

    def planned_batch_traffic(
        self, t: int, batch_sizes: list[int], sizes: TrafficSizes
    ) -> list[Transfer]:
        return []

    def planned_round(
        self, t: int, batch_sizes: list[int], sizes: TrafficSizes, costs: ComputeCosts
    ) -> tuple[list[Transfer], tuple[float, float]]:
        """One client's planned round t as the runtimes run it — by `for_round(t)`, starting
        from `received_parts(t)`: (its transfers, its FLOPs on the client and the S-Server)."""
        algo = self.for_round(t)
        traffic = algo.planned_traffic(t, batch_sizes, sizes, self.received_parts(t))
        return traffic, algo.planned_compute(t, batch_sizes, costs)

    def planned_compute(
        self, t: int, batch_sizes: list[int], costs: ComputeCosts
    ) -> tuple[float, float]:
        """FLOPs of one client's round *t*: (on the client, on the S-Server for this client).
        Split learning's by default: every sample passes forward and back through the client
        model and the server model."""
        n = sum(batch_sizes)
        return n * costs.client_model, n * costs.server_model


WARM_START_ROUND = 0


def first_round(cfg: Config) -> int:
    """Round 0 is the warm start, when the config asks for one; else rounds start at 1."""
    return WARM_START_ROUND if cfg.warm_start else WARM_START_ROUND + 1


def client_generator(seed: int, cid: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Each client's own RNG (batch order, augmentation): results do not depend on scheduling."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + cid + 1)


def clone_state(state: Mapping[str, Tensor]) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def uploads(batch_sizes: list[int], q: int) -> Iterator[int]:
    """Batch sizes of the local iterations k with k % q == 0 (when smashed data goes up)."""
    return (b for k, b in enumerate(batch_sizes) if k % q == 0)


def upload_count(batch_sizes: list[int], q: int) -> int:
    """How many local iterations send smashed data up."""
    return sum(1 for _ in uploads(batch_sizes, q))


def exchange_traffic(
    batch_sizes: Iterable[int], sizes: TrafficSizes, gradients: bool
) -> list[Transfer]:
    """z and labels up per batch, and ∂L/∂z down when the algorithm returns gradients."""
    out: list[Transfer] = []
    for b in batch_sizes:
        out += [
            ("activations", "up", b * sizes.activation_bytes),
            ("labels", "up", b * sizes.label_bytes),
        ]
        if gradients:
            out.append(("gradients", "down", b * sizes.activation_bytes))
    return out
