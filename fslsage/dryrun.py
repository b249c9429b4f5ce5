"""The plan of a config without training or data (SPEC §3, §6): the per-round communication
ledger and the simulated clock. Shapes and FLOPs come from the model (built on the meta device)
and the dataset's metadata."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator

import torch

from fslsage.algorithms import build_algorithm
from fslsage.algorithms.base import Algorithm, ComputeCosts, TrafficSizes, first_round
from fslsage.config import Config, ConfigError
from fslsage.data import client_sizes, describe_dataset
from fslsage.data.base import CLASSIFICATION
from fslsage.ledger import GIB, Ledger
from fslsage.models import cut_shape, dummy_input, state_bytes, training_flops
from fslsage.simulation import RoundClock, client_profiles

LABEL_BYTES = torch.empty((), dtype=torch.int64).element_size()


def meta_algorithm(cfg: Config) -> Algorithm:
    """The config's algorithm with its model on the meta device: shapes, no memory."""
    info = describe_dataset(cfg.dataset, **cfg.dataset_args)
    with torch.device("meta"):
        return build_algorithm(cfg, info)


def traffic_sizes(cfg: Config, algo: Algorithm | None = None) -> TrafficSizes:
    info = describe_dataset(cfg.dataset, **cfg.dataset_args)
    algo = algo or meta_algorithm(cfg)
    z_shape = cut_shape(algo.split, info)
    parts = {name: state_bytes(m) for name, m in algo.client_modules().items()}
    activation = math.prod(z_shape) * torch.empty((), dtype=torch.float32).element_size()
    labels_per_sample = 1 if info.task == CLASSIFICATION else info.input_shape[0]
    return TrafficSizes(activation, labels_per_sample * LABEL_BYTES, parts)


def compute_costs(cfg: Config) -> ComputeCosts:
    """Per-sample training FLOPs of the client, server and aux models of this config."""
    return _compute_costs(cfg.model, json.dumps(cfg.model_args, sort_keys=True),
                          cfg.dataset, json.dumps(cfg.dataset_args, sort_keys=True))  # fmt: skip


@functools.lru_cache(maxsize=16)  # the same model in every trial of a sweep: count it once
def _compute_costs(model: str, model_args: str, dataset: str, dataset_args: str) -> ComputeCosts:
    info = describe_dataset(dataset, **json.loads(dataset_args))
    cfg = Config(model=model, model_args=json.loads(model_args), dataset=dataset,
                 dataset_args=json.loads(dataset_args))  # fmt: skip
    split = meta_algorithm(cfg).split
    z = torch.zeros((1, *cut_shape(split, info)), device="meta")
    return ComputeCosts(
        client_model=float(training_flops(split.client, dummy_input(info))),
        server_model=float(training_flops(split.server, z)),
        aux_model=float(training_flops(split.aux, z)),
    )


def planned_client_sizes(cfg: Config) -> list[int]:
    info = describe_dataset(cfg.dataset, **cfg.dataset_args)
    num_classes = info.num_classes if info.task == CLASSIFICATION else 1  # as `prepare` labels
    try:
        return client_sizes(cfg.partition, info.num_train, cfg.num_clients,
                            cfg.shards_per_client, alpha=cfg.alpha, seed=cfg.seed,
                            num_classes=num_classes)  # fmt: skip
    except ValueError as e:  # as `prepare` says it: too few samples for the clients
        raise ConfigError("num_clients", f"{e}: {cfg.dataset} has {info.num_train} training "
                                         "samples") from None  # fmt: skip


def planned_clock(cfg: Config) -> RoundClock:
    """The simulated clock of SPEC §6 for this config."""
    algo = meta_algorithm(cfg)
    return RoundClock(
        algo,
        traffic_sizes(cfg, algo),
        compute_costs(cfg),
        planned_client_sizes(cfg),
        client_profiles(cfg.network_profile, cfg.num_clients, cfg.seed, cfg.network_args),
        server_flops=cfg.server_gflops * 1e9,
    )


def planned_round_ledgers(
    cfg: Config, clock: RoundClock | None = None
) -> Iterator[tuple[int, Ledger, float]]:
    """(round, its ledger, its simulated seconds), planned one round at a time, so a caller that
    stops at the budget never plans the rounds after it. gas follows the same schedule a run
    does (it depends on the profiles and sizes, not on training)."""
    clock = clock or planned_clock(cfg)
    if clock.algo.asynchronous:
        from fslsage.algorithms.gas import AsyncSchedule, event_seconds

        schedule = AsyncSchedule(cfg, clock.client_samples, event_seconds(clock))
        for t in range(1, cfg.rounds + 1):
            ledger, started = Ledger(), schedule.now
            for event, cid, batch in schedule.global_iteration():
                transfers = clock.algo.planned_event_traffic(event, batch, clock.sizes)
                for kind, direction, nbytes in transfers:
                    ledger.record(t, cid, kind, direction, nbytes)
            yield t, ledger, schedule.now - started
        return
    for t in range(first_round(cfg), cfg.rounds + 1):
        ledger = Ledger()
        for cid in range(len(clock.client_samples)):
            for kind, direction, nbytes in clock.plan(t, cid)[0]:
                ledger.record(t, cid, kind, direction, nbytes)
        yield t, ledger, clock.round_seconds(t, ledger)


def planned_async(cfg: Config, clock: RoundClock | None = None) -> tuple[Ledger, list[float]]:
    """gas: the ledger and the simulated seconds of each global iteration."""
    ledger, seconds = Ledger(), []
    for _, round_ledger, round_seconds in planned_round_ledgers(cfg, clock):
        ledger.merge(round_ledger)
        seconds.append(round_seconds)
    return ledger, seconds


def planned_ledger(cfg: Config, clock: RoundClock | None = None) -> Ledger:
    return planned_async(cfg, clock)[0]


def planned_rounds(cfg: Config) -> list[dict]:
    """Per-round ledger summaries with the cumulative simulated time (`sim_time_s`), stopping
    at the communication budget like a real run."""
    out, total_bytes, sim_time_s = [], 0, 0.0
    for t, ledger, round_seconds in planned_round_ledgers(cfg):
        summary = ledger.round_summary(t)
        total_bytes += summary["up_bytes"] + summary["down_bytes"]
        sim_time_s += round_seconds
        out.append({**summary, "sim_time_s": sim_time_s})
        if total_bytes / GIB >= cfg.comm_budget_gib:
            break
    return out
