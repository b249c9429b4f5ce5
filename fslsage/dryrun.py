"""The plan of a config without training or data (SPEC §3, §6): the per-round communication
ledger and the simulated clock. Shapes and FLOPs come from the model (built on the meta device)
and the dataset's metadata."""

from __future__ import annotations

import functools
import json
import math

import torch

from fslsage.algorithms import build_algorithm
from fslsage.algorithms.base import Algorithm, ComputeCosts, TrafficSizes, first_round
from fslsage.config import Config
from fslsage.data import client_sizes, describe_dataset
from fslsage.data.base import CLASSIFICATION
from fslsage.ledger import Ledger
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
    return client_sizes(cfg.partition, info.num_train, cfg.num_clients, cfg.shards_per_client)


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


def planned_async(cfg: Config, clock: RoundClock | None = None) -> tuple[Ledger, list[float]]:
    """gas: the ledger and the simulated seconds of each global iteration, from the same
    schedule a run follows (it depends on the profiles and sizes, not on training)."""
    from fslsage.algorithms.gas import AsyncSchedule, event_seconds

    clock = clock or planned_clock(cfg)
    schedule = AsyncSchedule(cfg, clock.client_samples, event_seconds(clock))
    ledger, seconds = Ledger(), []
    for t in range(1, cfg.rounds + 1):
        started = schedule.now
        for event, cid, batch in schedule.global_iteration():
            transfers = clock.algo.planned_event_traffic(event, batch, clock.sizes)
            for kind, direction, nbytes in transfers:
                ledger.record(t, cid, kind, direction, nbytes)
        seconds.append(schedule.now - started)
    return ledger, seconds


def planned_ledger(cfg: Config, clock: RoundClock | None = None) -> Ledger:
    clock = clock or planned_clock(cfg)
    if clock.algo.asynchronous:
        return planned_async(cfg, clock)[0]
    ledger = Ledger()
    for t in range(first_round(cfg), cfg.rounds + 1):
        for cid in range(len(clock.client_samples)):
            for kind, direction, nbytes in clock.plan(t, cid)[0]:
                ledger.record(t, cid, kind, direction, nbytes)
    return ledger


def planned_rounds(cfg: Config) -> list[dict]:
    """Per-round ledger summaries with the cumulative simulated time (`sim_time_s`), stopping
    at the communication budget like a real run."""
    clock = planned_clock(cfg)
    if clock.algo.asynchronous:
        ledger, seconds = planned_async(cfg, clock)
    else:
        ledger = planned_ledger(cfg, clock)
        seconds = [clock.round_seconds(t, ledger) for t in ledger.rounds()]
    out, sim_time_s = [], 0.0
    for t, round_seconds in zip(ledger.rounds(), seconds, strict=True):
        sim_time_s += round_seconds
        out.append({**ledger.round_summary(t), "sim_time_s": sim_time_s})
        if ledger.gib(through_round=t) >= cfg.comm_budget_gib:
            break
    return out
