"""The Ray runtime (SPEC §7): client actors, the S-Server actor and the F-Server coordinator
behind the same start_round / run_round / evaluate / close interface as
`fslsage.experiment.LocalRuntime`.

Per round the F-Server (this driver loop) opens the round on the S-Server, hands every client
actor the global weights (one object, put once), gathers the small reports, and has an actor
task on its aggregator actor average the clients' weights straight from the object store, so
weights never pass through the driver. A round's calls are all submitted at once and none waits
on the driver: the S-Server files client requests that overtake the round's opening. The driver
starts round t + 1 (`start_round`) before it reads round t's evaluation: the S-Server evaluates
round t's aggregate with the server as round t left it — the point the in-process runtime
evaluates at: its opening of round t + 1 snapshots the server, and the evaluation runs a test
batch at a time whenever no request is ready, so it stays off round t + 1's critical path —
while the driver writes round t's metrics. At the rounds the F-Server loop asks for
(`checkpoint.Cadence`) it checkpoints the clients, the S-Server and the global weights in the
object store; if an actor dies, Ray restarts it, every role is restored from the checkpoint and
the rounds since are re-run (deterministic with `exact` batching). An S-Server that Ray
restarted between rounds, with no call in flight to fail, is caught by the next opening: each
names the attempt whose end the server's state must follow.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.client_pool import ClientActor, owned_clients
from actors.common import DataBundle, assigned_resources, connect
from actors.ordering import StateLost
from actors.replica import ServerReplica
from actors.s_server import SServer
from fslsage import checkpoint as plain
from fslsage.algorithms.base import Algorithm, State, first_round
from fslsage.config import Config, ConfigError
from fslsage.experiment import Prepared, RoundOutcome, async_schedule
from fslsage.memory import peak_gpu_columns, split_peak_columns
from fslsage.placement import (
    EPS,
    actor_demands,
    check_fits,
    client_actor_count,
    replica_bundles,
    server_cpus,
    server_demand,
)
from fslsage.progress import phase_every_s

if TYPE_CHECKING:
    from fslsage.algorithms.gas import AsyncSchedule

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_RESTARTS = 3  # per actor, by Ray
MAX_RECOVERIES = 3  # per round, by the F-Server
DRAIN_TIMEOUT_S = 60.0  # how long an aborted round's surviving calls get to return
RESTART_TIMEOUT_S = 120.0  # how long a restarting actor gets to come back
PLACEMENT_TIMEOUT_S = 600.0  # how long the actors get to be placed and started


@functools.cache
def remote_class(cls: type) -> Any:
    """`cls` as a Ray actor class that Ray restarts when its process dies (once per class)."""
    return ray.remote(max_restarts=MAX_RESTARTS)(cls)


RemoteSServer = remote_class(SServer)


@dataclass(frozen=True)
class ActorClasses:
    """The classes RayRuntime starts its actors from: tests start subclasses that inject faults
    (tests/crashes.py)."""

    client: type[ClientActor] = ClientActor
    server: type[SServer] = SServer
    replica: type[ServerReplica] = ServerReplica


class Aggregator:
    """The F-Server's averaging, on a long-lived actor: each round is one actor task that reads
    the clients' weights from the object store, so weights never pass through the driver. A
    per-round plain task would need a warm task worker every round, and Ray reaps an idle one
    after a second: starting one again costs seconds. The algorithm is deserialised once, not
    per round."""

    def __init__(self, algo: Algorithm):
        self.algo = algo

    def aggregate(
        self,
        t: int,
        report_refs: list[ray.ObjectRef],
        weight_refs: list[ray.ObjectRef],
        order: list[tuple[int, int]] | None = None,
    ) -> dict[str, State]:
        """Called when the round starts, with the references nested (so Ray does not wait for
        them before the call runs). `weight_refs` are in the order the in-process runtime
        averages in: client-id order, or for gas `order`, the (report batch, index in its
        "reports") of each model in the model buffer."""
        fetched = ray.get([*report_refs, *weight_refs])  # one fetch
        n = len(report_refs)
        batches, weights = fetched[:n], fetched[n:]
        if order is None:
            reports = sorted((r for b in batches for r in b["reports"]), key=lambda r: r.cid)
        else:  # gas: the model buffer, in the order its clients finished
            reports = [batches[b]["reports"][i] for b, i in order]
        return self.algo.for_round(t).aggregate(
            [dataclasses.replace(r, weights=w) for r, w in zip(reports, weights, strict=True)]
        )

    def where(self) -> dict[str, Any]:
        return assigned_resources()


RemoteAggregator = remote_class(Aggregator)


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of every live node of the cluster this process joined."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


@dataclass
class TrialBundles:
    """Which bundle of a Tune trial's placement group each actor takes. tune/resources.py
    reserves [{} (the trial), S-Server, client actor 0, 1, …, GPU replicas…]; Tune drops the
    empty head bundle from the group it makes (the trial runs on bundle 0 with no resources),
    so the S-Server's bundle is the first after the head's, where the head is there at all.
    Each actor is started on its own bundle: left to Ray, a client actor can take the
    S-Server's bundle (its CPU and GPU), and the S-Server then waits for ever."""

    group: PlacementGroup
    server: int  # the S-Server's bundle; client actor k's is server + 1 + k
    clients: int
    replicas: int  # replica bundles, after the client actors'

    def index(self, role: str, i: int = 0) -> int | None:
        """The bundle of `role`'s actor i ("server", "client", "replica"); None for a replica
        beyond those reserved (one added later: Ray places it in the group)."""
        if role == "server":
            return self.server
        if role == "client":
            return self.server + 1 + i
        return self.server + 1 + self.clients + i if i < self.replicas else None

    @classmethod
    def current(cls, cfg: Config, num_client_actors: int) -> TrialBundles | None:
        """The bundles of the placement group this process runs in (None outside one, e.g. in
        `fslsage.run`); a RuntimeError where they are not a trial's of `cfg`."""
        group = get_current_placement_group()
        if group is None:
            return None
        specs = group.bundle_specs
        replicas = replica_bundles(cfg)
        server = len(specs) - (1 + num_client_actors + replicas)  # 0: Tune dropped the head
        placed = cls(group, server, num_client_actors, replicas)
        asks = [(server, server_demand(cfg))]
        client = {"CPU": cfg.client_cpus, "GPU": cfg.client_gpus}
        asks += [(placed.index("client", k), client) for k in range(num_client_actors)]
        asks += [(placed.index("replica", j), {"GPU": cfg.server_gpus}) for j in range(replicas)]
        if server not in (0, 1) or any(
            v > specs[i].get(k, 0.0) + EPS for i, need in asks for k, v in need.items()
        ):
            raise RuntimeError(
                f"the placement group this runtime starts in has the bundles {specs}; a trial of "
                f"this config reserves one for the S-Server ({server_demand(cfg)}), one for each "
                f"of {num_client_actors} client actors and {replicas} for GPU replicas "
                "(tune/resources.py)"
            )
        return placed


@dataclass
class ClientCalls:
    """The client actors' calls of one round attempt, as the S-Server and the aggregator take
    them."""

    report_refs: list[ray.ObjectRef]  # per call: its reports (gas: its summary)
    weight_refs: list[ray.ObjectRef]  # each client model, in the order they are averaged in
    cids: list[int]  # the clients the S-Server hears from
    turns: list[int] | None = None  # gas: the client of each S-Server request, in order
    order: list[tuple[int, int]] | None = None  # gas: see Aggregator.aggregate
    sim_seconds: float | None = None  # gas: the global iteration's simulated time


@dataclass
class StartedRound:
    """A round attempt's calls, submitted and not yet awaited."""

    t: int
    epoch: int
    report_refs: list[ray.ObjectRef]  # per client actor: its clients' reports
    new_global: ray.ObjectRef  # the aggregate
    end: ray.ObjectRef  # the S-Server's round metrics, once every client is done
    opening: ray.ObjectRef  # begin_round: the evaluation of `previous_global`, or None
    previous_global: ray.ObjectRef | None
    refs: list[ray.ObjectRef]  # what an aborted attempt must let return before a restore
    sim_seconds: float | None = None  # gas: the global iteration's simulated time


@dataclass
class Checkpoint:
    """Object-store references to the experiment state after round `t`."""

    t: int
    after: int  # the round attempt whose end the S-Server state follows
    global_weights: ray.ObjectRef
    server: ray.ObjectRef
    clients: list[ray.ObjectRef]
    schedule: AsyncSchedule | None = None  # gas: where the simulated-time schedule stood


class RayRuntime:
    def __init__(
        self,
        prepared: Prepared,
        address: str | None = None,
        actor_classes: ActorClasses | None = None,
    ):
        cfg, algo = prepared.cfg, prepared.algorithm
        if cfg.device == "cuda" and (cfg.client_gpus == 0 or cfg.server_gpus == 0):
            key = "client_gpus" if cfg.client_gpus == 0 else "server_gpus"
            raise ConfigError(key, "device: cuda on Ray needs GPUs for the client and S-Server "
                                   "actors (or device: auto)")  # fmt: skip
        self.cfg, self.algo = cfg, algo
        self.started_ray = connect(address)
        nodes = cluster_nodes()
        n = client_actor_count(cfg, nodes)
        try:  # before any actor starts: one that cannot be placed would wait for ever
            check_fits(actor_demands(cfg, n), nodes)
            self.bundles = TrialBundles.current(cfg, n)
        except (ConfigError, RuntimeError):
            self._shutdown_ray()
            raise
        self.algo_ref = ray.put(algo)
        self.data_ref = ray.put(DataBundle.of(prepared))
        self.owned = owned_clients(cfg.num_clients, n)
        self.classes = actor_classes or ActorClasses()  # a test's: actors that inject faults
        self.server = remote_class(self.classes.server).options(
            num_cpus=server_cpus(cfg),
            num_gpus=cfg.server_gpus,
            accelerator_type=cfg.server_accelerator or None,
            **self._in_bundle("server"),
        ).remote(self.algo_ref, self.data_ref, cfg.server_batching, cfg.max_batch,
                 cfg.max_wait_ms, cfg.server_gpus)  # fmt: skip
        client_class = remote_class(self.classes.client)
        self.client_actors = [
            client_class.options(
                num_cpus=cfg.client_cpus,
                num_gpus=cfg.client_gpus,
                **self._in_bundle("client", k),
            ).remote(self.algo_ref, self.data_ref, cids, self.server, cfg.client_gpus)
            for k, cids in enumerate(self.owned)
        ]
        self.aggregator = RemoteAggregator.options(num_cpus=0).remote(self.algo_ref)
        self.replicas: list[Any] = []  # server_mode stateless: the S-Server's replicas
        for _ in range(cfg.server_replicas if cfg.server_mode == "stateless" else 0):
            self.add_replica()
        self._wait_until_started()
        # gas: the F-Server plans each global iteration's events (they depend on no training)
        self.schedule = (
            async_schedule(cfg, [len(i) for i in prepared.client_indices])
            if algo.asynchronous
            else None
        )
        self.global_ref = ray.put(algo.for_round(first_round(cfg)).initial_global())
        self.epoch = 0  # round attempts: requests of an abandoned attempt are rejected
        self.server_after = 0  # the attempt whose end the S-Server's state follows (0: initial)
        self.started: StartedRound | None = None  # the round submitted and not finished
        self.evaluation: tuple[ray.ObjectRef, tuple[float, float]] | None = None
        self.checkpoint: Checkpoint | None = None
        if cfg.checkpoint_every:
            self._checkpoint(first_round(cfg) - 1)  # the state before the first round

    def _in_bundle(self, role: str, i: int = 0) -> dict[str, Any]:
        """The options that start `role`'s actor i on its bundle of the trial's placement group
        (`TrialBundles`); none outside a placement group: Ray places it."""
        index = None if self.bundles is None else self.bundles.index(role, i)
        if index is None:
            return {}
        strategy = PlacementGroupSchedulingStrategy(self.bundles.group, index)
        return {"scheduling_strategy": strategy}

    def _wait_until_started(self) -> None:
        """Every actor up (their errors raised here, not in round 1), or a clear error when the
        cluster cannot place them."""
        calls = [self.server.where.remote(), self.aggregator.where.remote()]
        calls += [r.where.remote() for r in self.replicas]
        calls += [a.where.remote() for a in self.client_actors]
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=PLACEMENT_TIMEOUT_S)
        if len(ready) < len(calls):
            cfg = self.cfg
            kind = f" ({cfg.server_accelerator})" if cfg.server_accelerator else ""
            raise RuntimeError(
                f"actors not started after {PLACEMENT_TIMEOUT_S:.0f} s: the S-Server asks for "
                f"{server_cpus(cfg):g} CPU and {cfg.server_gpus} GPU{kind}, "
                f"{len(self.client_actors)} client actors for "
                f"{cfg.client_cpus} CPU and {cfg.client_gpus} GPU each; the cluster has "
                f"{ray.cluster_resources()}"
            )
        ray.get(ready)

    def add_replica(self) -> Any:
        """One more stateless S-Server replica (server_mode: stateless), at any time: it takes
        the published weights, and clients use it from their next round."""
        replica_class = remote_class(self.classes.replica)
        replica = replica_class.options(
            num_cpus=0,
            num_gpus=self.cfg.server_gpus,
            **self._in_bundle("replica", len(self.replicas)),
        ).remote(self.algo_ref, self.server, self.cfg.server_gpus)
        ray.get(self.server.register_replica.remote(replica))
        self.replicas.append(replica)
        return replica

    # -- the Runtime interface ------------------------------------------------------------------
    def start_round(self, t: int) -> None:
        """Submits round t at once, after `run_round(t - 1)`: the S-Server evaluates round
        t − 1's global model on a snapshot it takes as it opens round t (before any of round t's
        requests), so `evaluate` reads that while round t already runs."""
        self._started(t, evaluate_previous=True)

    def run_round(self, t: int, checkpoint: bool = False) -> RoundOutcome:
        """Finishes round t (submitting it first, unless `start_round` has). `checkpoint`: keep
        the state at round t's end (to recover lost actors from, and for `state_dict`), where
        the F-Server loop's `checkpoint.Cadence` says so."""
        outcome = self._recovering(t, lambda: self._finish(self._started(t)))
        if checkpoint:
            self._checkpoint(t)
        return outcome

    def evaluate(self) -> tuple[float, float]:
        if self.evaluation is not None and self.evaluation[0] == self.global_ref:
            return self.evaluation[1]
        started = self.started
        if started is not None and started.previous_global == self.global_ref:

            def opening_or_direct() -> tuple[float, float]:
                if self.started is started:  # taken by the S-Server as it opened the next round
                    return ray.get(started.opening)
                return ray.get(self.server.evaluate.remote(self.global_ref))  # after a recovery

            loss, acc = self._recovering(started.t, opening_or_direct)
        else:
            loss, acc = ray.get(self.server.evaluate.remote(self.global_ref))
        self.evaluation = (self.global_ref, (loss, acc))
        return loss, acc

    def close(self) -> None:
        for actor in [*self.client_actors, *self.replicas, self.server, self.aggregator]:
            ray.kill(actor)
        self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self.started_ray:
            ray.shutdown()

    # -- one round --------------------------------------------------------------------------------
    def _started(self, t: int, evaluate_previous: bool = False) -> StartedRound:
        """Round t's calls: those submitted already, or submitted now."""
        if self.started is None:
            self.started = self._submit(t, evaluate_previous)
        elif self.started.t != t:
            raise RuntimeError(f"round {self.started.t} is running, not round {t}")
        return self.started

    def _submit(self, t: int, evaluate_previous: bool = False) -> StartedRound:
        """Every call of round t, none awaited: the client actors' first (they are the round's
        critical path), then the aggregation, the S-Server's opening (with the global model to
        evaluate, if asked) and its end of round. The round starts from the last finished
        round's aggregate and S-Server state."""
        weights, after = self.global_ref, self.server_after
        self.epoch += 1
        if self.algo.asynchronous:
            calls = self._global_iteration_calls(t, weights)
        else:
            calls = self._round_calls(t, weights)
        previous = weights if evaluate_previous else None
        handover = weights if self.algo.hands_over(t) else None
        opening = self.server.begin_round.remote(
            t, self.epoch, calls.cids, after, previous, handover, calls.turns, phase_every_s()
        )
        end = self.server.end_round.remote(t, self.epoch)
        new_global = self.aggregator.aggregate.remote(t, calls.report_refs, calls.weight_refs,
                                                      calls.order)  # fmt: skip
        refs = [*calls.report_refs, *calls.weight_refs, new_global]
        return StartedRound(t, self.epoch, calls.report_refs, new_global, end, opening, previous,
                            refs, calls.sim_seconds)  # fmt: skip

    def _round_calls(self, t: int, weights: ray.ObjectRef) -> ClientCalls:
        """A synchronous round, stage by stage (`Algorithm.round_stages`): the clients of a stage
        train from `weights` or, after the first stage, from the weights the stage before handed
        on (through the object store); each actor runs its own clients of a stage in id order."""
        cids = list(range(self.cfg.num_clients))
        report_refs: list[ray.ObjectRef] = []
        weight_of: dict[int, ray.ObjectRef] = {}  # each client's weights, in the object store
        for stage in self.algo.for_round(t).round_stages(cids):
            members = set(stage)
            for actor, owned in zip(self.client_actors, self.owned, strict=True):
                mine = [cid for cid in owned if cid in members]
                if not mine:
                    continue
                reports, *client_weights = actor.run_round.options(
                    num_returns=1 + len(mine)
                ).remote(t, self.epoch, weights, mine)
                report_refs.append(reports)
                weight_of.update(zip(mine, client_weights, strict=True))
            weights = weight_of[stage[-1]]  # what the next stage starts from
        return ClientCalls(report_refs, [weight_of[c] for c in cids], cids)

    def _global_iteration_calls(self, t: int, weights: ray.ObjectRef) -> ClientCalls:
        """gas: the schedule's next global iteration, each actor given its clients' events;
        the S-Server serves the steps in the schedule's order (its turns)."""
        assert self.schedule is not None
        began = self.schedule.now
        events = list(self.schedule.global_iteration())
        actor_index = {cid: a for a, owned in enumerate(self.owned) for cid in owned}
        per_actor: list[list[tuple[int, str, int]]] = [[] for _ in self.client_actors]
        finished = [0] * len(self.client_actors)
        order: list[tuple[int, int]] = []  # (call, its n-th finish) of each model buffered
        for index, (kind, cid, _batch) in enumerate(events):
            a = actor_index[cid]
            per_actor[a].append((index, kind, cid))
            if kind == "finish":
                order.append((a, finished[a]))
                finished[a] += 1
        report_refs: list[ray.ObjectRef] = []
        models: list[list[ray.ObjectRef]] = []
        for actor, actor_events, n in zip(self.client_actors, per_actor, finished, strict=True):
            refs = actor.run_global_iteration.options(num_returns=1 + n).remote(
                t, self.epoch, weights, actor_events
            )
            refs = refs if n else [refs]  # Ray hands back one return as a single reference
            report_refs.append(refs[0])
            models.append(refs[1:])
        turns = [cid for kind, cid, _ in events if kind == "step"]
        return ClientCalls(report_refs, [models[a][i] for a, i in order], sorted(set(turns)),
                           turns, order, self.schedule.now - began)  # fmt: skip

    def _finish(self, started: StartedRound) -> RoundOutcome:
        """Waits for the round's reports and server metrics; the new global model is left to
        the object store (the next round and the evaluation read it there)."""
        batches = _get_promptly(started.report_refs)
        server_metrics, peaks = split_peak_columns(ray.get(started.end))
        peaks.update(peak_gpu_columns(clients=[b["peak_gpu_mib"] for b in batches]))
        self.started = None
        self.global_ref, self.server_after = started.new_global, started.epoch
        if self.algo.asynchronous:  # the summaries of the actors' events
            losses = sorted(pair for summary in batches for pair in summary["losses"])
            loss = torch.tensor([value for _, value in losses]).mean()  # in schedule order
            ledger = [entry for summary in batches for entry in summary["ledger"]]
            return RoundOutcome(float(loss), ledger, server_metrics, started.sim_seconds, peaks)
        reports = sorted((r for b in batches for r in b["reports"]), key=lambda r: r.cid)
        return RoundOutcome.from_reports(reports, server_metrics, peaks)

    # -- checkpoints and recovery -----------------------------------------------------------------
    def _recovering(self, t: int, attempt: Callable[[], T]) -> T:
        """`attempt()`; if an actor died or lost its state meanwhile, every role goes back to
        the last checkpoint, the rounds before t run again and `attempt()` is tried again."""
        recoveries = 0
        while True:
            try:
                return attempt()
            except (RayActorError, StateLost) as e:
                if self.checkpoint is None or recoveries == MAX_RECOVERIES:
                    raise
                log.warning("round %d: an actor died or lost its state (%s); restoring round "
                            "%d's checkpoint",
                            t, type(e).__name__, self.checkpoint.t)  # fmt: skip
                self._recover(t)
                recoveries += 1

    def _checkpoint(self, t: int) -> None:
        server = self.server.state.remote()
        clients = [a.state.remote() for a in self.client_actors]
        # taken before the next round changes anything; the states stay in the object store
        ray.wait([server, *clients], num_returns=1 + len(clients), fetch_local=False)
        self.checkpoint = Checkpoint(t, self.server_after, self.global_ref, server, clients,
                                     copy.deepcopy(self.schedule))  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The newest checkpoint (of the last round `run_round` kept, taken at its end, before
        the next round was submitted) as plain data for the disk (`fslsage.checkpoint`): the
        S-Server's and every client actor's state as the bytes they gave (plain data too), the
        global weights and gas's schedule."""
        ckpt = self.checkpoint
        assert ckpt is not None, "checkpoint_every is 0"
        return {"round": ckpt.t, "after": ckpt.after, "server": ray.get(ckpt.server),
                "clients": ray.get(ckpt.clients),
                "global_weights": plain.capture(ray.get(ckpt.global_weights)),
                "schedule": plain.capture(ckpt.schedule)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint from the disk into this runtime's fresh actors (`--resume`): it becomes
        the checkpoint a lost actor is restored from, and every role is restored from it."""
        schedule = (None if self.schedule is None else
                    plain.restore(self.schedule, state["schedule"], "cpu", "schedule"))  # fmt: skip
        globals_ = plain.restore(None, state["global_weights"], "cpu", "global_weights")
        self.epoch = max(self.epoch, state["after"])
        self.checkpoint = Checkpoint(state["round"], state["after"], ray.put(globals_),
                                     ray.put(state["server"]),
                                     [ray.put(blob) for blob in state["clients"]],
                                     copy.deepcopy(schedule))  # fmt: skip
        self._recover(state["round"] + 1)

    def _recover(self, t: int) -> None:
        """Every role back to the checkpoint (Ray has restarted the dead actor or is doing so),
        then the rounds after it re-run, so round t starts from the state it had."""
        ckpt = self.checkpoint
        assert ckpt is not None
        # first the S-Server: it aborts the round, so clients waiting on it return
        _when_up(lambda: ray.get(self.server.load_state.remote(ckpt.server, ckpt.after)))
        self.server_after = ckpt.after
        inflight = self.started.refs if self.started is not None else []
        self.started = None
        if inflight:
            ray.wait(inflight, num_returns=len(inflight), timeout=DRAIN_TIMEOUT_S,
                     fetch_local=False)  # fmt: skip
        for actor, state in zip(self.client_actors, ckpt.clients, strict=True):
            _when_up(lambda a=actor, s=state: ray.get(a.load_state.remote(s)))
        self.global_ref = ckpt.global_weights
        self.schedule = copy.deepcopy(ckpt.schedule)  # the rounds since plan their events again
        for s in range(ckpt.t + 1, t):
            self._finish(self._started(s))

    # -- diagnostics ----------------------------------------------------------------------------
    def placement(self) -> dict[str, Any]:
        """Where each actor runs and what it was given (tests, logs)."""
        return {
            "server": ray.get(self.server.where.remote()),
            "aggregator": ray.get(self.aggregator.where.remote()),
            "clients": ray.get([a.where.remote() for a in self.client_actors]),
        }

    def server_stats(self) -> dict[str, Any]:
        return ray.get(self.server.stats.remote())


def _when_up(call: Callable[[], Any], timeout: float = RESTART_TIMEOUT_S) -> Any:
    """`call()`, retried while its actor is still restarting (Ray refuses calls meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _get_promptly(refs: list[ray.ObjectRef]) -> list[Any]:
    """ray.get of each ref as it completes, so a failed call raises at once even while others
    still wait (e.g. on the S-Server, for the client that died)."""
    out: dict[ray.ObjectRef, Any] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        out[ready[0]] = ray.get(ready[0])
    return [out[r] for r in refs]
