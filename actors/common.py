"""What the client actors and the S-Server actor share: the dataset as it sits in the object
store, the form of the tensors in their messages, device placement and (de)serialising role
objects for checkpoints; and how the project starts a local Ray instance (`start_local_ray`)."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fslsage.checkpoint import capture, restore
from fslsage.config import Config
from fslsage.data import ClientShard
from fslsage.data.base import DatasetInfo
from fslsage.experiment import Prepared, apply_compute_settings

log = logging.getLogger(__name__)
RAY_BIND_ENV = "FSLSAGE_RAY_BIND"  # where a locally started Ray listens (default: loopback)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # 0: Ray addresses this machine as 127.0.0.1


@dataclass(frozen=True)
class SharedArray:
    """A tensor's memory as a C-ordered numpy array, plus how to view it as the tensor again.

    Numpy arrays cross the object store zero-copy, but only in C order: a channels-last view
    (strides (HWC, 1, WC, C)) would come back NCHW-strided, and convolutions would then take a
    different kernel than in the in-process runtime — results no longer bit-identical."""

    memory: np.ndarray
    order: tuple[int, ...]  # the tensor's dims, outermost in memory first
    strides: tuple[int, ...]

    @classmethod
    def of(cls, x: torch.Tensor) -> SharedArray:
        order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
        return cls(x.permute(order).contiguous().numpy(), order, tuple(x.stride()))

    def tensor(self) -> torch.Tensor:
        """A read-only view on the shared memory with the original strides (also those of
        size-1 dims, which decide e.g. whether a conv input counts as channels-last)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(self.memory)
        t = t.permute(sorted(range(t.dim()), key=lambda d: self.order[d]))
        dims = zip(t.stride(), self.strides, t.shape, strict=True)
        same_memory = all(a == b for a, b, n in dims if n > 1)
        return t.as_strided(t.shape, self.strides) if same_memory else t


@dataclass(frozen=True)
class DataBundle:
    """The dataset in the object store: `ray.put` stores it once per node and every actor on
    that node views the arrays zero-copy in shared memory. The training samples are stored
    client after client, each client's in its shard's order, so a shard is a slice: a view, not
    a copy, of the shared memory."""

    info: DatasetInfo
    train_x: SharedArray  # the shards, concatenated in client order
    train_y: SharedArray
    test_x: SharedArray
    test_y: SharedArray
    offsets: tuple[int, ...]  # client c's samples are rows offsets[c] : offsets[c + 1]
    label_counts: np.ndarray  # (clients, classes): the partition's label histogram

    @classmethod
    def of(cls, prepared: Prepared) -> DataBundle:
        ds = prepared.dataset
        order = torch.as_tensor(np.concatenate(prepared.client_indices), dtype=torch.long)
        offsets = np.cumsum([0, *(len(i) for i in prepared.client_indices)])
        arrays = (ds.train_x[order], ds.train_y[order], ds.test_x, ds.test_y)
        return cls(ds.info, *(SharedArray.of(t) for t in arrays), tuple(map(int, offsets)),
                   prepared.histogram)  # fmt: skip

    def shard(self, cid: int, device: torch.device) -> ClientShard:
        """Client `cid`'s samples, in the order `Prepared.shard` gathers them: on the CPU, a
        read-only view of the shared memory (the shard only ever reads them)."""
        rows = slice(self.offsets[cid], self.offsets[cid + 1])
        return ClientShard(self.train_x.tensor()[rows], self.train_y.tensor()[rows], self.info,
                           device)  # fmt: skip

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Test tensors viewing the shared memory; evaluation only reads them."""
        return self.test_x.tensor(), self.test_y.tensor()


# A CUDA context (driver state, kernel images, cuBLAS/cuDNN handles: some hundreds of MiB, more
# on big cards) lives outside the caching allocator that `set_per_process_memory_fraction` caps.
# Every process on a card has one, so actors capped at exactly their shares (4 x 0.25) would ask
# for the whole card plus 4 contexts and the last one to grow would fail with out-of-memory: each
# cap leaves this much of its share for its own context.
CUDA_CONTEXT_BYTES = 1 << 30


def memory_fraction(gpu_fraction: float, total_bytes: int) -> float:
    """The caching-allocator cap of an actor with `gpu_fraction` of a card of `total_bytes`:
    its share less its CUDA context (`CUDA_CONTEXT_BYTES`), never below half its share (a small
    share of a small card)."""
    return max(gpu_fraction - CUDA_CONTEXT_BYTES / total_bytes, gpu_fraction / 2)


def cap_cuda_memory(device: torch.device, gpu_fraction: float) -> None:
    """An actor with a fractional GPU keeps to its share of the card's memory (less its CUDA
    context, see `memory_fraction`). `device` must name its card: cuda:<index>."""
    if device.type == "cuda" and 0 < gpu_fraction < 1:
        if device.index is None:
            raise ValueError(f"cap_cuda_memory needs an indexed device (cuda:N), got {device}")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(gpu_fraction, total), device)


def set_up_actor(cfg: Config, gpu_fraction: float, role: str) -> torch.device:
    """What every actor of a run does first: the run's torch settings (threads, determinism:
    the same sums as the in-process runtime) and its device (`actor_device`)."""
    apply_compute_settings(cfg)
    return actor_device(cfg, gpu_fraction, role)


def actor_device(cfg: Config, gpu_fraction: float, role: str) -> torch.device:
    """The device of a process Ray started (an actor, a Tune trial), its memory capped to its
    GPU share (`cap_cuda_memory`). `device: auto` is CUDA only where Ray assigned this process
    GPUs (`ray.get_gpu_ids()`): Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it finds it for a process
    given none (unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1), so `torch.cuda.is_available()`
    would be true there too and put the process, uncapped, on the node's first card, the one
    another actor (the S-Server) may own. A CUDA device is indexed (cuda:N, the current one:
    the card Ray assigned, as CUDA_VISIBLE_DEVICES numbers it), as the memory cap needs.
    Where Ray assigned GPUs and CUDA does not start, a RuntimeError names `role` and the ids.
    The in-process runtime resolves its device without Ray (`fslsage.experiment.resolve_device`).
    """
    import ray

    gpu_ids = ray.get_gpu_ids()
    if cfg.device == "cpu" or (cfg.device == "auto" and not gpu_ids):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"{role}: Ray assigned GPU ids {list(gpu_ids)} (device: {cfg.device}) but CUDA does "
            f"not start in this process (torch.cuda.is_available() is False; "
            f"CUDA_VISIBLE_DEVICES={visible!r}, torch built for CUDA {torch.version.cuda})"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    cap_cuda_memory(device, gpu_fraction)
    return device


def pack(obj: Any) -> Any:
    """A message for another actor: tensors (also inside tuples, lists and dicts) as CPU numpy
    arrays, which Ray moves zero-copy and serialises faster than tensors (about 0.7 ms less per
    round trip of a 64 KiB batch here); dtypes numpy lacks (bfloat16) stay tensors."""
    if isinstance(obj, torch.Tensor):
        try:
            return obj.detach().cpu().numpy()
        except TypeError:
            return obj.detach().cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(pack(o) for o in obj)
    if isinstance(obj, dict):
        return {k: pack(v) for k, v in obj.items()}
    return obj


def unpack(obj: Any, device: torch.device | str) -> Any:
    """The tensors of a packed message, copied onto `device`: Ray's arrays are read-only views
    of the object store, the maths needs tensors of its own."""
    if isinstance(obj, np.ndarray):
        return torch.tensor(obj, device=device)
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(unpack(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: unpack(v, device) for k, v in obj.items()}
    return obj


def dumps(obj: Any) -> bytes:
    """A role object's state (clients, an S-Server with its per-client state, RNGs) as bytes of
    plain data (`fslsage.checkpoint.capture`): tensors, numbers, strings and containers."""
    buf = io.BytesIO()
    torch.save(capture(obj), buf)
    return buf.getvalue()


def loads(blob: bytes, target: Any, device: torch.device | str) -> Any:
    """`dumps`'s bytes written back into `target`, a role object built from the same config (a
    restarted actor's, or the live one rolled back): read with `weights_only`, so bytes from
    elsewhere cannot run code here; tensors go where the target keeps them (a generator's state
    stays on the CPU, parameters on this actor's device), new ones to `device`."""
    plain = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return restore(target, plain, device)


def assigned_resources() -> dict[str, Any]:
    """Where this actor runs and what Ray gave it (tests and diagnostics); `cores`: the cores
    its main thread may run on, `threads`: torch's intra-op threads."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources(),
            "pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled()}  # fmt: skip


def connect(address: str | None = None, log_to_driver: bool = True) -> bool:
    """How the project reaches Ray (a run's runtime, a sweep): joins `address` (or
    $RAY_ADDRESS; `auto` joins a `ray start` left running here) or starts a local instance
    sized to the machine, listening on loopback only (`start_local_ray`); an instance this
    process already runs is reused. `log_to_driver`: the actors' output is printed here too.
    True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    else:
        start_local_ray(include_dashboard=False, log_to_driver=log_to_driver)
    return True


def start_local_ray(**init_kwargs: Any) -> None:
    """Starts a new local Ray instance (`ray.init(address="local", **init_kwargs)`) whose every
    port listens on the loopback interface only: Ray's gRPC servers (GCS, raylet, workers,
    dashboard agent), its metrics export and autoscaler metrics endpoints and the runtime-env
    agent otherwise listen on all interfaces, some without a token (e.g. the metrics). Only for
    an instance this process starts; to join a cluster, call `ray.init(address=...)` instead.

    $FSLSAGE_RAY_BIND configures it: unset or a loopback address, loopback only; `0.0.0.0` (or
    `::`), Ray's own choice (all interfaces); any other address is the node's address, for
    other machines to join this instance (Ray then listens on all interfaces).

    How (Ray 2.60): Ray's servers bind loopback only when the node's IP is the loopback
    address, but Ray rewrites a loopback address (`_node_ip_address`, or the GCS address a
    process joins) to the machine's routable IP unless $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0.
    It is set to 0 here, in this process's environment — so that processes started from here
    (a sweep subprocess, `ray job submit`) reach this instance at its loopback GCS address —
    and in Ray's copy of it, read when Ray was imported. A process started elsewhere joins this
    instance with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_ADDRESS=127.0.0.1:<port>."""
    import ray
    from ray._private import ray_constants

    bind = os.environ.get(RAY_BIND_ENV, "").strip() or LOOPBACK[0]
    if bind not in LOOPBACK:
        if bind not in ("0.0.0.0", "::"):
            init_kwargs.setdefault("_node_ip_address", bind)
        ray.init(address="local", **init_kwargs)
        return
    os.environ[RAY_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in LOOPBACK:  # a Ray that chooses its address another way
        log.warning("the local Ray instance took address %s, not loopback: its ports may "
                    "listen on all interfaces", node_ip)  # fmt: skip
