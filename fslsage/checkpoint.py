"""Durable runs (issue 22): the whole state of an experiment as plain data on disk, written
atomically every `checkpoint_every` rounds, or sooner where rounds are long (`Cadence`), under
the run's own folder and read back with `torch.load(weights_only=True)`, so a checkpoint file
can hold tensors, numbers, strings and containers of them, and nothing that runs code when
loaded.

`capture(obj)` turns a role object — a client, an S-Server of any algorithm, a GAS schedule —
into such plain data by walking its attributes: modules and optimizers as their state_dicts,
generators as their states, tensors on the CPU, other objects attribute by attribute; what a
run rebuilds from its config (the config, the data, functions, devices) is left out.
`restore(target, plain)` writes it back into an object of the same structure that the run has
just built from the same config: nothing is constructed from the file, only values are set."""

from __future__ import annotations

import os
import re
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

KIND = "__kind__"  # tags the captured objects that a restore must write into, not replace
FOLDER = "checkpoints"  # in a run's output folder
FILE = re.compile(r"^round-(\d{6})\.pt$")
PLAIN = (bool, int, float, str, type(None))


def _left_out(obj: Any) -> bool:
    """What a run rebuilds from its config rather than from a checkpoint."""
    from fslsage.config import Config
    from fslsage.data import ClientShard
    from fslsage.data.base import Dataset, DatasetInfo

    return isinstance(obj, (Config, ClientShard, Dataset, DatasetInfo, torch.device, torch.dtype,
                            type, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                            partial))  # fmt: skip


def capture(obj: Any) -> Any:
    """obj's state as plain data (see the module's docstring)."""
    if isinstance(obj, PLAIN):
        return obj
    if isinstance(obj, Tensor):  # a meta tensor (a model sized without memory) has no data
        return obj.detach() if obj.is_meta else obj.detach().cpu()
    if hasattr(obj, "checkpoint_state"):  # an object that knows better (e.g. ClientStates)
        return {KIND: "custom", "state": capture(obj.checkpoint_state())}
    if isinstance(obj, nn.Module):
        return {KIND: "module", "state": capture(dict(obj.state_dict()))}
    if isinstance(obj, torch.optim.Optimizer):
        return {KIND: "optimizer", "state": capture(obj.state_dict())}
    if isinstance(obj, torch.Generator):
        return {KIND: "generator", "state": obj.get_state()}
    if isinstance(obj, np.random.Generator):
        return {KIND: "numpy_generator", "state": obj.bit_generator.state}
    if isinstance(obj, np.ndarray):
        return {KIND: "ndarray", "state": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return tuple(capture(v) for v in obj)
    if isinstance(obj, list):
        return [capture(v) for v in obj]
    if isinstance(obj, dict):
        return {k: capture(v) for k, v in obj.items() if not _left_out(v)}
    if hasattr(obj, "__dict__"):
        return {KIND: "object", "state": {k: capture(v) for k, v in vars(obj).items()
                                          if not _left_out(v)}}  # fmt: skip
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def restore(target: Any, plain: Any, device: torch.device | str = "cpu", where: str = "") -> Any:
    """Writes `plain` (from `capture`) into `target`, built anew from the same config; returns
    the restored value (the same object, or a new value for plain data). Tensors go where the
    target's are, new ones (a buffer that was empty when built) to `device`."""
    kind = plain.get(KIND) if isinstance(plain, dict) else None
    if kind is not None:
        state = plain["state"]
        if kind == "custom":
            target.restore_checkpoint(state, device)
        elif kind in ("module", "optimizer"):
            if not isinstance(target, (nn.Module, torch.optim.Optimizer)):
                raise ValueError(f"checkpoint: {where or 'the object'} holds a {kind}, the run "
                                 f"built a {type(target).__name__}")  # fmt: skip
            target.load_state_dict(state)
        elif kind == "generator":
            target.set_state(state)
        elif kind == "numpy_generator":
            target.bit_generator.state = state
        elif kind == "ndarray":
            return state.numpy().copy()
        elif kind == "object":
            restore_attributes(target, state, device, where)
        return target
    if isinstance(plain, Tensor):
        return plain.to(target.device if isinstance(target, Tensor) else device)
    if isinstance(plain, (list, tuple)):
        same = isinstance(target, (list, tuple)) and len(target) == len(plain)
        values = [restore(target[i] if same else None, v, device, f"{where}[{i}]")
                  for i, v in enumerate(plain)]  # fmt: skip
        if isinstance(target, list) and same:
            target[:] = values  # in place: others may hold the list
            return target
        if isinstance(target, tuple) and same and hasattr(target, "_fields"):  # a NamedTuple
            return type(target)(*values)
        return type(plain)(values)
    if isinstance(plain, dict):
        if isinstance(target, dict):
            for key, value in plain.items():
                target[key] = restore(target.get(key), value, device, f"{where}[{key!r}]")
            return target
        return {k: restore(None, v, device, f"{where}[{k!r}]") for k, v in plain.items()}
    return plain


def restore_attributes(target: Any, state: dict[str, Any], device: torch.device | str,
                       where: str = "") -> None:  # fmt: skip
    """Each captured attribute of `state` restored into the same attribute of `target`."""
    for key, value in state.items():
        setattr(target, key, restore(getattr(target, key, None), value, device, f"{where}.{key}"))


class Cadence:
    """When a run checkpoints: after every `checkpoint_every`-th round, and after a round that
    begins `checkpoint_minutes` or more after the last checkpoint (or the run's start), so a
    crash costs at most that long plus a round however long the rounds are. Never where
    checkpoint_every is 0. Asked as each round begins, and the runtime told (`run_round(t,
    checkpoint=...)`): the Ray runtime takes its actors' states as the round ends, before the
    next round starts on them."""

    def __init__(self, every: int, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.every, self.seconds, self.clock = every, minutes * 60, clock
        self.last = clock()

    def due(self, t: int) -> bool:
        """Whether round t, about to begin, ends with a checkpoint."""
        if not self.every:
            return False
        late = self.seconds > 0 and self.clock() - self.last >= self.seconds
        return t % self.every == 0 or late

    def saved(self) -> None:
        """A checkpoint was just taken: the next time-based one is counted from now."""
        self.last = self.clock()


# ----------------------------------------------------------------------------- files
def path(folder: Path, t: int) -> Path:
    """Round t's checkpoint file in `folder`."""
    return folder / f"round-{t:06d}.pt"


def save(folder: Path, t: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Round t's checkpoint, written atomically (a temporary file renamed into place) into
    `folder`; only the newest `keep` stay."""
    folder.mkdir(parents=True, exist_ok=True)
    final = path(folder, t)
    tmp = folder / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    remove_all(folder, keep)
    return final


def rounds(folder: Path) -> list[int]:
    """The rounds checkpointed in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := FILE.match(p.name)))


def remove_all(folder: Path, keep: int = 0) -> None:
    """Deletes the checkpoints in `folder` (checkpoint files only) but the newest `keep`."""
    done = rounds(folder)
    for t in done[: len(done) - keep]:
        path(folder, t).unlink(missing_ok=True)


def load(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint in `folder` (None if there is none), read as plain data only."""
    done = rounds(folder)
    if not done:
        return None
    return torch.load(path(folder, done[-1]), map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """The process-wide generators a run draws from (dropout, initialisations)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
