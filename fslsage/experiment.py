"""One experiment: data, partition and algorithm set up once (`prepare`), then the F-Server loop
(`run_experiment`) driving any runtime — in-process (`LocalRuntime`) or Ray (`actors/`)."""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from fslsage import checkpoint
from fslsage.algorithms import ALGORITHMS, build_algorithm
from fslsage.algorithms.base import (
    IGNORE_INDEX,
    Algorithm,
    ClientReport,
    State,
    first_round,
    loss_fn,
)
from fslsage.config import Config, ConfigError
from fslsage.data import (
    BatchStream,
    ClientShard,
    describe_dataset,
    label_histogram,
    load_dataset,
    partition,
    prepare_inputs,
)
from fslsage.data.base import CLASSIFICATION, Dataset, DatasetInfo
from fslsage.dryrun import planned_clock
from fslsage.ledger import Ledger
from fslsage.memory import peak_gpu_columns, peak_gpu_mib
from fslsage.precision import autocast
from fslsage.progress import eta_seconds, format_duration, phases_reported
from fslsage.results import write_parquet_atomic
from fslsage.transport import local_send, run_client_round

if TYPE_CHECKING:
    from fslsage.algorithms.gas import AsyncSchedule

METRIC_COLUMNS = [
    "round", "test_acc", "test_loss", "train_loss", "comm_gib", "up_gib", "down_gib",
    "sim_time_s", "wall_s",
]  # fmt: skip


class TrainingDiverged(RuntimeError):
    """A loss went NaN/inf: the run stops with the round and the value as its reason."""


def resolve_device(cfg: Config) -> torch.device:
    """The in-process runtime's device, outside Ray: `auto` is CUDA where CUDA is available.
    A CUDA device is indexed (the current card), as e.g. a memory cap needs it. (A process Ray
    started resolves its device with `actors.common.actor_device`, from what Ray assigned it.)"""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class ComputeSettings:
    """The process-wide torch settings a run computes with (`apply_compute_settings`)."""

    threads: int
    deterministic: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    matmul_tf32: bool
    cudnn_tf32: bool

    @classmethod
    def current(cls) -> ComputeSettings:
        cudnn = torch.backends.cudnn
        return cls(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   cudnn.deterministic, cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                   cudnn.allow_tf32)  # fmt: skip

    def apply(self) -> None:
        torch.set_num_threads(self.threads)
        # warn_only: an op without a deterministic kernel warns instead of stopping the run
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = self.matmul_tf32
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32


def apply_compute_settings(cfg: Config) -> ComputeSettings:
    """Sets what every process that computes sets before it computes — the in-process runtime
    and every Ray actor alike, so their sums reduce the same way: `threads` torch threads and,
    with `deterministic`, deterministic kernels and no TF32 (else cuDNN benchmarks its kernels
    and keeps the fastest). Returns the settings before, to put back (`ComputeSettings.apply`)."""
    before = ComputeSettings.current()
    if cfg.deterministic:  # cuBLAS reads it when it starts: set before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    det = cfg.deterministic
    ComputeSettings(cfg.threads, det, det, not det, False, not det).apply()
    return before


@dataclass
class Prepared:
    """What every runtime needs: the data, who holds which samples, and the algorithm."""

    cfg: Config
    dataset: Dataset
    client_indices: list[np.ndarray]
    histogram: np.ndarray  # (clients, classes) label counts
    algorithm: Algorithm

    @property
    def info(self) -> DatasetInfo:
        return self.dataset.info

    def shard(self, cid: int, device: torch.device) -> ClientShard:
        idx = torch.as_tensor(self.client_indices[cid])
        return ClientShard(self.dataset.train_x[idx], self.dataset.train_y[idx], self.info, device)


def prepare(cfg: Config) -> Prepared:
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, **cfg.dataset_args)
    info = dataset.info
    if info.task == CLASSIFICATION:
        labels = dataset.train_y.numpy()
    else:  # language modelling: no class labels to skew, every partition is over one class
        labels = np.zeros(len(dataset.train_y), dtype=np.int64)
    try:
        parts = partition(cfg.partition, labels, cfg.num_clients, alpha=cfg.alpha,
                          shards_per_client=cfg.shards_per_client, seed=cfg.seed)  # fmt: skip
    except ValueError as e:  # the files hold fewer samples than the dataset's nominal size
        key = "shards_per_client" if cfg.partition == "shards" else "num_clients"
        raise ConfigError(key, f"{e}: {cfg.dataset} in {cfg.data_dir} has {len(labels)} "
                               f"training samples") from None  # fmt: skip
    num_classes = info.num_classes if info.task == CLASSIFICATION else 1
    hist = label_histogram(labels, parts, num_classes)
    return Prepared(cfg, dataset, parts, hist, build_algorithm(cfg, info))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo,
             batch_size: int, device: torch.device) -> tuple[float, float]:  # fmt: skip
    """Test loss and accuracy (token accuracy for language models, ignoring padding). The model
    goes back to the mode it was in: the server model keeps training after evaluation."""
    steps = evaluation_steps(model, x, y, info, batch_size, device)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


@torch.no_grad()
def evaluation_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, batch_size: int,
    device: torch.device,
) -> Generator[None, None, tuple[float, float]]:  # fmt: skip
    """`evaluate`, one test batch per step; returns (loss, accuracy) when exhausted. The S-Server
    runs the steps in the gaps between its requests."""
    was_training = model.training
    model.eval()
    try:
        # sums stay on the device: one sync at the end, not three per batch
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, len(x), batch_size):
            if start:  # a pause between batches; the last one's step also returns the result
                yield
            xb = prepare_inputs(x[start : start + batch_size].to(device), info)
            yb = y[start : start + batch_size].to(device)
            logits = model(xb)
            mask = yb != IGNORE_INDEX
            total_loss += loss_fn(logits, yb, reduction="sum").double()
            correct += ((logits.argmax(-1) == yb) & mask).sum()
            count += mask.sum()
        n = max(int(count), 1)
        return float(total_loss) / n, int(correct) / n
    finally:
        model.train(was_training)


@dataclass
class RoundOutcome:
    train_loss: float
    ledger: list  # Ledger entries of every client in this round
    server_metrics: dict[str, float] = field(default_factory=dict)
    sim_seconds: float | None = None  # an asynchronous schedule's own clock; else the §6 clock
    # the round's peak GPU memory columns (`fslsage.memory.peak_gpu_columns`; none on the CPU)
    peak_gpu_mib: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_reports(
        cls, reports: list[ClientReport], server_metrics: dict, peak_gpu_mib: dict | None = None
    ) -> RoundOutcome:
        n = sum(r.num_samples for r in reports)
        loss = sum(r.train_loss * r.num_samples for r in reports) / n
        return cls(loss, [e for r in reports for e in r.ledger], server_metrics,
                   peak_gpu_mib=peak_gpu_mib or {})  # fmt: skip


class Runtime(Protocol):
    """Runs rounds. `start_round(t)` may begin round t while the driver still reads round t − 1
    (its evaluation); `run_round(t)` finishes round t (starting it if need be; `checkpoint`:
    the driver checkpoints round t, and a runtime with `state_dict` answers with the state at
    its end); `evaluate()` answers for the global model after the last finished round, even
    while the next one runs."""

    def start_round(self, t: int) -> None: ...
    def run_round(self, t: int, checkpoint: bool = False) -> RoundOutcome: ...
    def evaluate(self) -> tuple[float, float]: ...
    def close(self) -> None: ...


def async_schedule(cfg: Config, client_samples: list[int]) -> AsyncSchedule:
    """gas's simulated-time schedule of a run: the profiles' event times (`event_seconds`)."""
    from fslsage.algorithms.gas import AsyncSchedule, event_seconds

    return AsyncSchedule(cfg, client_samples, event_seconds(planned_clock(cfg)))


class LocalRuntime:
    """Everything in this process, clients one after another in client-id order: the reference
    semantics and the overhead baseline for the Ray runtime."""

    def __init__(self, prepared: Prepared, device: torch.device | None = None):
        """`device`: where to compute; by default `resolve_device` (a Tune trial passes the
        device Ray's assignment gives it)."""
        cfg, algo = prepared.cfg, prepared.algorithm
        self.prepared, self.algo, self.cfg = prepared, algo, cfg
        self.settings_before = apply_compute_settings(cfg)  # as every Ray actor does
        self.device = resolve_device(cfg) if device is None else device
        self.shards = [prepared.shard(cid, self.device) for cid in range(cfg.num_clients)]
        ds = prepared.dataset  # the test set on the evaluating device once, as stored (uint8)
        self.test_x, self.test_y = ds.test_x.to(self.device), ds.test_y.to(self.device)
        self.clients = [
            algo.new_client(cid, len(s), self.device) for cid, s in enumerate(self.shards)
        ]
        self.server = algo.new_server(self.device)
        if self.server is not None:  # the label histograms, shared once (gas's logit adjustment)
            self.server.set_label_counts(prepared.histogram)
        self.send = local_send(self.server)
        self.global_weights: dict[str, State] = {
            p: {k: v.to(self.device) for k, v in s.items()}
            for p, s in algo.for_round(first_round(cfg)).initial_global().items()
        }
        if algo.asynchronous:
            self._start_schedule()

    def _start_schedule(self) -> None:
        """gas: the simulated-time schedule and each client's endless minibatch stream."""
        self.schedule = async_schedule(self.cfg, [len(s) for s in self.shards])
        self.streams = [
            BatchStream(shard, self.cfg.batch_size, client.generator)
            for client, shard in zip(self.clients, self.shards, strict=True)
        ]

    def start_round(self, t: int) -> None:
        """Nothing to overlap in one process: round t runs in `run_round`."""

    def run_round(self, t: int, checkpoint: bool = False) -> RoundOutcome:
        """Round t; its end state is what `state_dict` reads until the next round, whether
        `checkpoint` or not (in one process nothing else holds state)."""
        if self.server is not None:
            self.server.begin_round(t)
        if self.algo.asynchronous:
            return self._run_global_iteration(t)
        if self.algo.hands_over(t):
            self.server.start_from(self.global_weights)
        reports: list[ClientReport] = []
        weights = self.global_weights  # a later stage's: what the one before it handed on
        for stage in self.algo.for_round(t).round_stages(list(range(len(self.clients)))):
            for cid in stage:
                reports.append(run_client_round(self.algo, self.clients[cid], self.shards[cid], t,
                                                weights, self.send))  # fmt: skip
            weights = reports[-1].weights
        self.global_weights = self.algo.for_round(t).aggregate(reports)
        server_metrics = self.server.end_round(t) if self.server is not None else {}
        return RoundOutcome.from_reports(reports, server_metrics, self._peak_gpu_mib())

    def _run_global_iteration(self, t: int) -> RoundOutcome:
        ledger, started = Ledger(), self.schedule.now
        with autocast(self.cfg, self.device):
            self.global_weights, loss = self.algo.global_iteration(
                t, self.schedule.global_iteration(), self.clients, self.streams,
                self.global_weights, self.send, ledger,
            )  # fmt: skip
        return RoundOutcome(float(loss), ledger.entries(), self.server.end_round(t),
                            sim_seconds=self.schedule.now - started,
                            peak_gpu_mib=self._peak_gpu_mib())  # fmt: skip

    def _peak_gpu_mib(self) -> dict[str, float]:
        """This process's peak GPU memory since the last round's reading (the evaluation
        between rounds counts in the next round): the `peak_gpu_mib` column, none on the CPU."""
        return peak_gpu_columns(local=peak_gpu_mib(self.device))

    def evaluate(self) -> tuple[float, float]:
        server_model = self.server.eval_model() if self.server is not None else None
        model = self.algo.eval_module(self.global_weights, server_model, self.device)
        with autocast(self.cfg, self.device):
            return evaluate(model, self.test_x, self.test_y, self.prepared.info,
                            self.cfg.eval_batch_size, self.device)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes as the run goes, as plain data (`fslsage.checkpoint`): the
        clients, the S-Server, the global weights, gas's schedule and data streams, and this
        process's generators."""
        state = {name: checkpoint.capture(getattr(self, name)) for name in self._changing()}
        return {**state, "rng": checkpoint.rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state_dict` written back into this runtime, freshly built from the same config."""
        for name in self._changing():
            setattr(self, name, checkpoint.restore(getattr(self, name), state[name], self.device,
                                                   name))  # fmt: skip
        checkpoint.set_rng_state(state["rng"])

    def _changing(self) -> tuple[str, ...]:
        names = ("clients", "server", "global_weights")
        return (*names, "schedule", "streams") if self.algo.asynchronous else names

    def close(self) -> None:
        self.settings_before.apply()


def progress_line(cfg: Config, rows: list[dict]) -> str:
    """The last round's line, with the time left at the pace of the recent rounds."""
    row = rows[-1]
    eta = eta_seconds(rows, cfg.rounds, cfg.comm_budget_gib)
    return (
        f"[{cfg.name}] {cfg.algorithm} round {row['round']:>3}/{cfg.rounds}  "
        f"comm {row['comm_gib']:9.4f} GiB  test_acc {row['test_acc']:.4f}  "
        f"test_loss {row['test_loss']:.4f}  sim {row['sim_time_s']:.1f}s  "
        f"elapsed {row['wall_s']:.1f}s  left {format_duration(eta)}"
    )


def phase_printer(cfg: Config, t: int, progress: Callable[[str], None] | None
                  ) -> Callable[[str], None] | None:  # fmt: skip
    """Where a long phase of round t stands (`fslsage.progress.report_phase`), as a line."""
    if progress is None:
        return None
    return lambda text: progress(f"[{cfg.name}] round {t}/{cfg.rounds}: {text}")


def checkpoint_folder(cfg: Config, runtime: Runtime, out_dir: str | Path | None) -> Path | None:
    """OUT/checkpoints, where a run checkpoints (`checkpoint_every` > 0, an output folder and a
    runtime that can give its state), else None."""
    if out_dir is None or not cfg.checkpoint_every or not hasattr(runtime, "state_dict"):
        return None
    return Path(out_dir) / checkpoint.FOLDER


def resume_from(cfg: Config, runtime: Runtime, folder: Path | None) -> dict[str, Any]:
    """The newest checkpoint in `folder`, its runtime state loaded into `runtime`. A
    checkpoint of other settings is refused: the rounds after it would not be this run's."""
    if folder is None:
        raise ConfigError("--resume", "nothing to resume from: checkpoint_every is 0")
    try:
        saved = checkpoint.load(folder)
    except pickle.UnpicklingError as e:  # what weights_only refuses: nothing of it ran
        raise ConfigError("--resume", f"the newest checkpoint in {folder} is not plain data and "
                          f"was not loaded ({str(e).splitlines()[0]})") from None  # fmt: skip
    if saved is None:
        raise ConfigError("--resume", f"no checkpoint in {folder}")
    now = cfg.to_dict()
    changed = [k for k in now if k not in RESUMABLE and saved["config"].get(k) != now[k]]
    if changed:
        key = changed[0]
        raise ConfigError("--resume", f"the checkpoint in {folder} was written with {key}="
                          f"{saved['config'].get(key)!r}, this run has {now[key]!r}")  # fmt: skip
    runtime.load_state_dict(saved["runtime"])
    return saved


# keys a resumed run may change: how long it runs and how it is placed, not what it computes
RESUMABLE = (
    "rounds",
    "comm_budget_gib",
    "checkpoint_every",
    "checkpoint_minutes",
    "num_client_actors",
    "name",
    "plot_x_scale",
)


def run_experiment(
    cfg: Config,
    runtime: Runtime,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    on_round: Callable[[dict], None] | None = None,
    resume: bool = False,
) -> pd.DataFrame:
    """The F-Server loop: rounds until `rounds` or the communication budget; one metrics row per
    round, rewritten atomically to OUT/metrics.parquet after every round. The next round is
    started before this one's evaluation is read, so a runtime that can overlaps them.
    `sim_time_s` is the simulated wall-clock of SPEC §6 (`fslsage.simulation`).

    Every `checkpoint_every` rounds, and after a round begun `checkpoint_minutes` after the
    last checkpoint (`checkpoint.Cadence`), the whole experiment goes to OUT/checkpoints/ (a
    runtime with `state_dict`); `resume` goes on from the newest there, and its rows equal an
    uninterrupted run's."""
    ledger = Ledger()
    clock = planned_clock(cfg)
    language = describe_dataset(cfg.dataset, **cfg.dataset_args).task != CLASSIFICATION
    columns = ALGORITHMS.get(cfg.algorithm).metric_columns  # the algorithm's own server metrics
    rows: list[dict] = []
    sim_time_s = 0.0
    start = time.perf_counter()
    folder = checkpoint_folder(cfg, runtime, out_dir)
    cadence = checkpoint.Cadence(cfg.checkpoint_every, cfg.checkpoint_minutes)
    first = first_round(cfg)
    if resume:
        saved = resume_from(cfg, runtime, folder)
        rows, ledger, sim_time_s = saved["rows"], Ledger(saved["ledger"]), saved["sim_time_s"]
        start -= saved["wall_s"]
        spent = bool(rows) and rows[-1]["comm_gib"] >= cfg.comm_budget_gib  # nothing left to run
        first = cfg.rounds + 1 if spent else saved["round"] + 1
        if progress is not None:
            progress(f"[{cfg.name}] resumed after round {saved['round']} from {folder}")
    for t in range(first, cfg.rounds + 1):
        due = cadence.due(t)
        with phases_reported(phase_printer(cfg, t, progress)):  # e.g. a long alignment
            outcome = runtime.run_round(t, checkpoint=due)
        if not math.isfinite(outcome.train_loss):
            raise TrainingDiverged(f"train_loss is {outcome.train_loss} in round {t}")
        ledger.merge(outcome.ledger)
        if t < cfg.rounds and ledger.gib() < cfg.comm_budget_gib:
            runtime.start_round(t + 1)
        test_loss, test_acc = runtime.evaluate()
        if outcome.sim_seconds is not None:
            sim_time_s += outcome.sim_seconds
        else:
            sim_time_s += clock.round_seconds(t, ledger)
        row = {
            "round": t,
            "test_acc": test_acc,
            "test_loss": test_loss,
            "train_loss": outcome.train_loss,
            "comm_gib": ledger.gib(),
            "up_gib": ledger.gib("up"),
            "down_gib": ledger.gib("down"),
            "sim_time_s": sim_time_s,
            "wall_s": time.perf_counter() - start,
        }
        if language:  # test_loss is the per-token NLL of the continuations
            # capped at e^700: math.exp raises beyond the float range (about e^709)
            row["test_perplexity"] = math.exp(min(test_loss, 700.0))
        for name in columns:  # NaN in a round that did not log it
            row[name] = outcome.server_metrics.get(name, float("nan"))
        row.update(outcome.peak_gpu_mib)  # peak_gpu_mib* columns: on CUDA only
        rows.append(row)
        if out_dir is not None:
            write_parquet_atomic(pd.DataFrame(rows), Path(out_dir) / "metrics.parquet")
        if due:
            cadence.saved()
        if due and folder is not None:
            checkpoint.save(folder, t, {
                "round": t, "config": cfg.to_dict(), "runtime": runtime.state_dict(),
                "rows": rows, "ledger": ledger.entries(), "sim_time_s": sim_time_s,
                "wall_s": row["wall_s"],
            })  # fmt: skip
        if progress is not None:
            progress(progress_line(cfg, rows))
        if on_round is not None:
            on_round(row)
        if row["comm_gib"] >= cfg.comm_budget_gib:
            if progress is not None:
                progress(f"[{cfg.name}] communication budget {cfg.comm_budget_gib} GiB reached")
            break
    return pd.DataFrame(rows)
