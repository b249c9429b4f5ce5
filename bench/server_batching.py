"""S-Server throughput under `coalesce` over `exact`: 8 concurrent clients, each sending gradient
requests (splitfed_v2's exchange: smashed data up, ∂L/∂z down) back to back, against one S-Server
actor. Clients do no local work here, so this measures the server side alone.

Prints requests per second of both policies, the batch sizes `coalesce` formed, and as its last
line `coalesce/exact requests/s: X`.

    .venv/bin/python bench/server_batching.py [--clients 8] [--requests 200] [--set key=value]
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch

from actors.common import DataBundle, pack, start_local_ray
from actors.runtime import RemoteSServer
from fslsage.config import load_config
from fslsage.experiment import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@ray.remote
class LoadClient:
    """One client that only talks to the S-Server: `n` exchanges, each waiting for its answer."""

    def __init__(self, server, cid: int, z: torch.Tensor, y: torch.Tensor):
        self.server, self.cid, self.z, self.y = server, cid, *pack((z, y))

    def run(self, epoch: int, n: int) -> float:
        start = time.perf_counter()
        for seq in range(n):
            ray.get(self.server.submit.remote(epoch, self.cid, seq, "exchange", self.z, self.y))
        self.server.submit.remote(epoch, self.cid, n, "done")
        return time.perf_counter() - start


def requests_per_second(prepared, batching: str, clients: int, n: int) -> tuple[float, dict]:
    cfg = prepared.cfg
    server = RemoteSServer.options(num_cpus=0).remote(
        prepared.algorithm, DataBundle.of(prepared), batching, cfg.max_batch, cfg.max_wait_ms
    )
    shard = prepared.shard(0, torch.device("cpu"))
    x, y = next(shard.batches(cfg.batch_size, 1, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        z = prepared.algorithm.split.client(x)
    cpus = (os.cpu_count() or 1) / clients
    load = [LoadClient.options(num_cpus=cpus).remote(server, c, z, y) for c in range(clients)]
    cids = list(range(clients))
    try:
        for epoch, count in ((1, 5), (2, n)):  # round 1 warms every actor and connection up
            ray.get(server.begin_round.remote(epoch, epoch, cids, after=epoch - 1))
            start = time.perf_counter()
            ray.get([c.run.remote(epoch, count) for c in load])
            ray.get(server.end_round.remote(epoch, epoch))
            elapsed = time.perf_counter() - start
        stats = ray.get(server.stats.remote())
    finally:
        for actor in [server, *load]:
            ray.kill(actor)
    return clients * n / elapsed, stats["batch_sizes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="per client")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    overrides = ["algorithm=splitfed_v2", f"max_batch={args.clients}", *args.overrides]
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides)
    prepared = prepare(cfg)
    cores = os.cpu_count() or 1
    # a Ray instance of its own, sized to this machine, even where a cluster is up: the figure
    # is this machine's
    start_local_ray(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        exact, _ = requests_per_second(prepared, "exact", args.clients, args.requests)
        coalesce, sizes = requests_per_second(prepared, "coalesce", args.clients, args.requests)
    finally:
        ray.shutdown()
    print(f"machine: {cores} CPU cores; {cfg.model} S-Server, batch {cfg.batch_size}, "
          f"{args.clients} concurrent clients x {args.requests} requests, max_batch "
          f"{cfg.max_batch}, max_wait_ms {cfg.max_wait_ms}")  # fmt: skip
    print(f"exact:    {exact:8.0f} requests/s")
    print(f"coalesce: {coalesce:8.0f} requests/s  (batches formed, size: count: {sizes})")
    print(f"coalesce/exact requests/s: {coalesce / exact:.2f}")


if __name__ == "__main__":
    main()
