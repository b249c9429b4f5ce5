"""Memory at scale (issue 19.3): the S-Server's per-client state on the GPU only while that
client is served (`ClientStates`), and each process's peak GPU memory per round
(`peak_gpu_mib`, the `peak_gpu_mib*` columns of the metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fslsage.config import Config

MIB = 1 << 20
HOST = torch.device("cpu")
S = TypeVar("S", bound=tuple)


def offloads_client_state(cfg: Config, device: torch.device) -> bool:
    """`offload_client_state`: always, never, or (auto) where the S-Server computes on CUDA."""
    if cfg.offload_client_state == "auto":
        return device.type == "cuda"
    return cfg.offload_client_state == "always"


class ClientStates(Generic[S]):
    """The S-Server's per-client state — FSL-SAGE's aux model, its optimizer and alignment FIFO
    of each client; splitfed_v1's server copy of each client and its optimizer — kept on the
    compute device only while its client is served. `states[i]` is client i's state on the
    device: offloading, it moves client i's state there and the state of the client served
    before it back to the CPU, so at most one client's state is on the device at any time. In
    the CIFAR-10 ResNet-18 paper config with 100 clients that is 40 MiB of fsl_sage aux state
    instead of 3.9 GiB, or one 160 MiB splitfed_v1 server copy (with gradients and Adam's
    moments) instead of 15.6 GiB, most of a 24 GiB card (tests/test_memory.py). Without
    offloading every state lives on the device and `states[i]` is a plain look-up.

    A state is a tuple (a NamedTuple reads best) of parts: modules (their parameters, gradients
    and buffers move; parameters keep their identity, so optimizers and hooks that hold them keep
    working), optimizers (their per-parameter tensors move; a `step` count kept on the CPU stays
    there, as torch keeps it) and objects that keep their tensors in a tuple `tensors`
    (`FifoBuffer`).

    Every move is a copy, also from the CPU to the CPU: forcing offload on a CPU run goes
    through the same path (`moves` counts the states moved). Copies do not block the host: from
    the GPU they land in pinned memory (torch pins the destination of a non-blocking copy to the
    host), and from there back they are asynchronous; a copy back is ordered after the copy out
    on the stream. Before the host itself reads or writes kept states (`stored`, a checkpoint's
    pickling) it waits for the copies out."""

    def __init__(self, states: list[S], device: torch.device, offload: bool):
        """`states`, built on the CPU, are kept there (offload) or moved to `device`."""
        self.states, self.device, self.offload = states, device, offload
        self.resident: int | None = None  # offloading: whose state is on the device
        self.moves = 0
        self.copying_out = False  # copies to the host may still run on the device
        if not offload:
            for state in states:
                map_state(state, lambda t: t.to(device))

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, cid: int) -> S:
        """Client cid's state on the compute device (offloading: it becomes the resident one)."""
        if self.offload and self.resident != cid:
            if self.resident is not None:
                self._move_out(self.resident)
            self._move_in(cid)
            self.resident = cid
        return self.states[cid]

    def _move_in(self, cid: int) -> None:
        self._move(cid, self.device)

    def _move_out(self, cid: int) -> None:
        self._move(cid, HOST)
        self.copying_out = self.device.type == "cuda"

    def _move(self, cid: int, device: torch.device) -> None:
        map_state(self.states[cid], lambda t: t.to(device, non_blocking=True, copy=True))
        self.moves += 1

    def stored(self) -> list[S]:
        """Every client's state where it is kept now, nothing moved: for work on all clients at
        once (averaging the copies, handing weights to all of them). The host may touch them."""
        if self.copying_out:
            torch.cuda.synchronize(self.device)
            self.copying_out = False
        return self.states

    def checkpoint_state(self) -> list[S]:
        """What a checkpoint keeps (`fslsage.checkpoint`): every client's state, wherever it is
        kept; which one is resident is not state."""
        return self.stored()

    def restore_checkpoint(self, plain: list, device: torch.device | str) -> None:
        """Each client's state written into it where it is kept now (`fslsage.checkpoint`)."""
        from fslsage.checkpoint import restore

        for cid, (state, saved) in enumerate(zip(self.stored(), plain, strict=True)):
            self.states[cid] = restore(state, saved, HOST if self.offload else self.device,
                                       f"client state {cid}")  # fmt: skip

    def __getstate__(self) -> dict:
        self.stored()  # a checkpoint pickles the kept tensors: they must have arrived
        return self.__dict__


def map_state(state: tuple, fn: Callable[[Tensor], Tensor]) -> None:
    """Replaces every tensor of a client state (see `ClientStates`) by fn(tensor), in place."""
    for part in state:
        if isinstance(part, nn.Module):
            part._apply(fn)  # what Module.to does: parameters in place, their grads, buffers
        elif isinstance(part, torch.optim.Optimizer):
            for per_param in part.state.values():
                for key, value in per_param.items():
                    if _moves(key, value):
                        per_param[key] = fn(value)
        else:
            part.tensors = tuple(fn(t) for t in part.tensors)


def _moves(key: str, value: object) -> bool:
    """Whether an optimizer's per-parameter value moves with its parameter: a tensor, but not a
    `step` count kept on the CPU."""
    return torch.is_tensor(value) and not (key == "step" and value.device == HOST)


def state_tensors(state: tuple) -> list[Tensor]:
    """The tensors `map_state` moves, each once."""
    found: list[Tensor] = []
    for part in state:
        if isinstance(part, nn.Module):
            params = list(part.parameters())
            found += [*params, *(p.grad for p in params if p.grad is not None), *part.buffers()]
        elif isinstance(part, torch.optim.Optimizer):
            found += [value for per_param in part.state.values()
                      for key, value in per_param.items() if _moves(key, value)]  # fmt: skip
        else:
            found += part.tensors
    return list({id(t): t for t in found}.values())


def state_bytes(state: tuple) -> int:
    """Bytes a client state takes on the device (numel × element size; meta tensors count)."""
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


class OnDevice(Mapping[str, Tensor]):
    """A state_dict whose tensors are copied to `device` one at a time, as they are read: the
    average of 100 offloaded server copies needs one copy of a tensor at a time on the device,
    not 100 models."""

    def __init__(self, state: Mapping[str, Tensor], device: torch.device):
        self.state, self.device = state, device

    def __getitem__(self, key: str) -> Tensor:
        return self.state[key].to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


# ----------------------------------------------------------------------------- peak memory
PEAK_GPU_MIB = "peak_gpu_mib"


def peak_gpu_mib(device: torch.device) -> float | None:
    """This process's peak GPU memory on `device` since the last reading, in MiB
    (`torch.cuda.max_memory_allocated`: the tensors' memory, not the allocator's cache nor the
    CUDA context); each reading starts the next (`torch.cuda.reset_peak_memory_stats`). None off
    CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / MIB
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def peak_gpu_columns(
    local: float | None = None,
    server: float | None = None,
    replicas: Iterable[float | None] = (),
    clients: Iterable[float | None] = (),
) -> dict[str, float]:
    """A round's peak GPU memory columns from the readings (`peak_gpu_mib`) of each process:
    `peak_gpu_mib` (the in-process runtime), `peak_gpu_mib_server` (the S-Server actor),
    `peak_gpu_mib_replicas` and `peak_gpu_mib_clients` (the largest reading of the stateless
    replicas and of the client actors). A column without a reading (a process off CUDA) is left
    out: a CPU run has none, and a round without one reads as NaN in the metrics table."""
    kinds = {"": [local], "_server": [server], "_replicas": replicas, "_clients": clients}
    out = {}
    for suffix, readings in kinds.items():
        known = [r for r in readings if r is not None]
        if known:
            out[PEAK_GPU_MIB + suffix] = max(known)
    return out


def split_peak_columns(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(the metrics without the peak GPU memory columns, those columns)."""
    peaks = {k: v for k, v in metrics.items() if k.startswith(PEAK_GPU_MIB)}
    return {k: v for k, v in metrics.items() if k not in peaks}, peaks
