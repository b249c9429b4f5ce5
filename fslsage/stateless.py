"""`server_mode: stateless` (SPEC §2; the "file-based gradient synchronization" seed): the
S-Server of an algorithm that returns gradients (sl, splitfed_v2) as stateless replicas and a
reducer.

A replica, on a request (z, y), with the published server weights θ and changing nothing:
    loss = NLL(x_s(z; θ), y);  ∂L/∂z goes down to the client;
    ∂L/∂θ (and the BN buffers the forward pass moved) go to the gradient store.
The reducer, every `sync_every` stored gradients (0: once a round, at its end):
    θ.grad = the mean of the stored ∂L/∂θ (buffers: the mean of the stored ones);
    one optimizer step; publish θ to every replica.

With `sync_every: 1` this is the stateful shared server exactly: each request is answered with
the weights the previous one left. With `sync_every: 0` every request of a round sees the
weights of the round's start, so the order in which replicas serve them does not matter.
A gradient record travels by value (the object store) or as a file under a shared path; the
transport (in-process here, replica actors on Ray: actors/replica.py) is not this module's.
"""

from __future__ import annotations

import copy
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fslsage.algorithms.base import Server, State, clone_state, loss_fn

GRADIENT_STORES = ("object_store", "files")


@dataclass
class GradientRecord:
    """What a replica writes for one request: ∂L/∂θ per trainable parameter and the buffers
    after its forward pass."""

    grads: State
    buffers: State


def replica_answer(
    model: nn.Module, z: Tensor, y: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, GradientRecord]:
    """A replica's work on one request: (∂L/∂z, loss, its gradient record). The model's
    parameters are untouched and its buffers are put back: the replica keeps no state."""
    buffers = clone_state(dict(model.named_buffers()))
    z = z.detach().requires_grad_(True)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model(z), y, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(loss, [z, *(p for _, p in params)], allow_unused=True)
    moved = clone_state(dict(model.named_buffers()))
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    record = GradientRecord(
        grads={n: g.detach() for (n, _), g in zip(params, grads[1:], strict=True) if g is not None},
        buffers=moved,
    )
    return grads[0], loss.detach(), record


def save_record(directory: str | Path, record: GradientRecord) -> str:
    """Writes a record under `directory` atomically (a reader never sees half a file); returns
    its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}.pt"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"grads": record.grads, "buffers": record.buffers}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


def load_record(path: str | Path, device: torch.device | str = "cpu") -> GradientRecord:
    blob = torch.load(path, map_location=device, weights_only=True)
    return GradientRecord(blob["grads"], blob["buffers"])


def gradient_store_dir(cfg) -> str:
    """Where record files go: `gradient_store_path`, which the entry points set to a folder of
    the run's own (`run_gradient_store`); a library caller that left it empty gets a folder in
    this machine's temporary directory."""
    return cfg.gradient_store_path or os.path.join(tempfile.gettempdir(), "fslsage-gradients")


def run_gradient_store(cfg, run_dir: str | Path):
    """`cfg` with the gradient store of this run, for `gradient_store: files`: `<run
    folder>/gradients`, or with `gradient_store_path` given (a path every node sees, shared by
    runs), a new `run-<id>` folder under it, so a run only ever deletes its own records."""
    if cfg.server_mode != "stateless" or cfg.gradient_store != "files":
        return cfg
    if cfg.gradient_store_path:
        folder = Path(cfg.gradient_store_path) / f"run-{uuid.uuid4().hex[:12]}"
    else:
        folder = Path(run_dir) / "gradients"
    return cfg.replace(gradient_store_path=str(folder.resolve()))


def remove_gradient_store(cfg) -> None:
    """Deletes what is left in a run's gradient store (records of a round that did not finish)
    and the folder: only record files, and only in the folder `run_gradient_store` chose."""
    if cfg.server_mode != "stateless" or cfg.gradient_store != "files":
        return
    folder = Path(cfg.gradient_store_path)
    if not cfg.gradient_store_path or not folder.is_dir():
        return
    for path in [*folder.glob("*.pt"), *folder.glob("*.tmp")]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something else lives there: not ours to delete
        pass


class StatelessServer(Server):
    """The S-Server role in stateless mode: the reducer, which holds the master weights and the
    optimizer, and in-process the one replica that serves every request (on Ray,
    `server_replicas` actors do, and only the reducer runs here: it holds no replica). Records
    arrive through `on_gradient`, by value or as the path of a file."""

    publishes = True  # its weights go to the replicas after every step (`published`)

    def __init__(self, model: nn.Module, cfg, num_clients: int):
        super().__init__(model, cfg, num_clients)
        self.replica: nn.Module | None = None  # the published weights, from the first request
        self.version = 0  # reducer steps so far
        self.pending: list[GradientRecord | str] = []
        self.applied = 0  # gradient records applied (tests: none lost, none twice)

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps (`fslsage.checkpoint`): all but the in-process replica, which
        is the published weights and is made again from them at the next request."""
        return {k: v for k, v in vars(self).items() if k != "replica"}

    def restore_checkpoint(self, plain: dict, device: torch.device | str) -> None:
        from fslsage.checkpoint import restore_attributes

        restore_attributes(self, plain, device)
        self.replica = None

    def on_exchange(self, cid, z, y):
        """In-process: a replica answers, its record goes to the store and on to the reducer."""
        if self.replica is None:  # the master weights are the published ones between steps
            self.replica = copy.deepcopy(self.model)
        grad, loss, record = replica_answer(self.replica, z, y, self.cfg.label_smoothing)
        if self.cfg.gradient_store == "files":
            self.on_gradient(cid, save_record(gradient_store_dir(self.cfg), record))
        else:
            self.on_gradient(cid, record)
        return grad, loss

    def on_gradient(self, cid: int, record: GradientRecord | str) -> None:
        self.pending.append(record)
        if self.cfg.sync_every and len(self.pending) >= self.cfg.sync_every:
            self.reduce()

    def reduce(self) -> None:
        """One optimizer step on the mean of the pending records, then publish."""
        device = next(self.model.parameters()).device
        paths = [r for r in self.pending if isinstance(r, str)]
        records = [load_record(r, device) if isinstance(r, str) else r for r in self.pending]
        n = len(records)
        params = dict(self.model.named_parameters())
        self.opt.zero_grad(set_to_none=True)
        for name in records[0].grads:
            total = sum(r.grads[name].to(device, torch.float64) for r in records)
            params[name].grad = (total / n).to(params[name].dtype)
        with torch.no_grad():
            for name, value in self.model.named_buffers():
                stacked = sum(r.buffers[name].to(device, torch.float64) for r in records) / n
                value.copy_(stacked if value.is_floating_point() else stacked.round())
        self.opt.step()
        self.version += 1
        self.applied += n
        self.pending = []
        if self.replica is not None:
            self.replica.load_state_dict(self.model.state_dict())
        for path in paths:  # applied: the store lets go of them
            Path(path).unlink(missing_ok=True)

    def published(self) -> State:
        return clone_state(self.model.state_dict())

    def end_round(self, t: int) -> dict[str, float]:
        if self.pending:  # sync_every 0 (once a round), or what is left of the last group
            self.reduce()
        return super().end_round(t)
