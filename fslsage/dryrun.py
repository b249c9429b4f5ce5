"""The per-round communication ledger of a config without training or data (SPEC §3):
shapes come from the model (built on the meta device) and the dataset's metadata."""

from __future__ import annotations

import math

import torch

from fslsage.algorithms.base import TrafficSizes
from fslsage.config import Config
from fslsage.data import client_sizes, describe_dataset, local_batch_sizes
from fslsage.data.base import CLASSIFICATION
from fslsage.experiment import build_algorithm
from fslsage.ledger import Ledger
from fslsage.models import cut_shape, state_bytes

LABEL_BYTES = torch.empty((), dtype=torch.int64).element_size()


def traffic_sizes(cfg: Config) -> TrafficSizes:
    info = describe_dataset(cfg.dataset, **cfg.dataset_args)
    with torch.device("meta"):
        algo = build_algorithm(cfg, info)
        z_shape = cut_shape(algo.split, info)
        parts = {name: state_bytes(m) for name, m in algo.client_modules().items()}
    activation = math.prod(z_shape) * torch.empty((), dtype=torch.float32).element_size()
    labels_per_sample = 1 if info.task == CLASSIFICATION else info.input_shape[0]
    return TrafficSizes(activation, labels_per_sample * LABEL_BYTES, parts)


def planned_ledger(cfg: Config) -> Ledger:
    info = describe_dataset(cfg.dataset, **cfg.dataset_args)
    with torch.device("meta"):
        algo = build_algorithm(cfg, info)
    sizes = traffic_sizes(cfg)
    ledger = Ledger()
    counts = client_sizes(cfg.partition, info.num_train, cfg.num_clients, cfg.shards_per_client)
    for t in range(1, cfg.rounds + 1):
        for cid, n in enumerate(counts):
            batches = local_batch_sizes(n, cfg.batch_size, cfg.local_epochs)
            for kind, direction, nbytes in algo.planned_traffic(t, batches, sizes):
                ledger.record(t, cid, kind, direction, nbytes)
    return ledger


def planned_rounds(cfg: Config) -> list[dict]:
    """Per-round ledger summaries, stopping at the communication budget like a real run."""
    ledger = planned_ledger(cfg)
    out = []
    for t in ledger.rounds():
        out.append(ledger.round_summary(t))
        if ledger.gib(through_round=t) >= cfg.comm_budget_gib:
            break
    return out
