"""What one trial reserves: a Tune PlacementGroupFactory sized from the trial's own config.

`runtime: local` runs the whole experiment in the trial process: one bundle {CPU: 1} (plus
`server_gpus` GPUs if asked; the trial computes on CUDA only with them, `actors.common.
actor_device`). `runtime: ray` reserves what the actors it starts will ask for: an empty head
bundle for the trial (the F-Server loop only waits on actors), one bundle for the S-Server
{CPU: 1, GPU: server_gpus} (its CPU reserved on a CPU-only run too, where it computes on the
CPU), one per client actor {CPU: client_cpus, GPU: client_gpus} and, in stateless mode on GPUs,
one per S-Server replica {GPU: server_gpus}. The runtime starts each actor on its own bundle
(`actors.runtime.TrialBundles`), so concurrent trials never oversubscribe the cluster and no
actor takes another's bundle. Client actors are counted per card (`client_actor_count`): the
cluster size a sweep records is its totals, taken as one node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors import runtime as actors_runtime
from fslsage import placement
from fslsage.config import Config, search_choices


def _nonzero(bundle: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in bundle.items() if v}


TRIAL_SERVER_CPUS = 1.0  # the S-Server bundle's CPU


def client_actor_count(cfg: Config, cluster: dict[str, float]) -> int:
    """Client actors that fit the cluster next to the S-Server bundle (one CPU) and the GPU
    replicas', GPU shares packed per card. The trial pins the result into its config so the
    actors it starts match the bundles reserved for them."""
    return placement.client_actor_count(cfg, cluster, reserved_cpus=TRIAL_SERVER_CPUS)


def trial_bundles(cfg: Config, cluster: dict[str, float]) -> list[dict[str, float]]:
    """Placement-group bundles of one trial; the first is the trial process's own."""
    if cfg.runtime == "local":
        return [_nonzero({"CPU": 1.0, "GPU": cfg.server_gpus})]
    server = placement.server_demand(cfg, cpus=TRIAL_SERVER_CPUS)
    client = _nonzero({"CPU": cfg.client_cpus, "GPU": cfg.client_gpus})
    n = client_actor_count(cfg, cluster)
    # stateless replicas take no CPU but a GPU share each, if the S-Server has one
    replicas = placement.replica_bundles(cfg)
    replica = {"GPU": cfg.server_gpus}
    return [{}, _nonzero(server)] + [dict(client) for _ in range(n)] + [replica] * replicas


RESOURCE_KEYS = (
    "runtime", "client_cpus", "client_gpus", "server_gpus", "server_accelerator",
    "num_client_actors", "server_mode", "server_replicas",
)  # fmt: skip


def trial_demands(cfg: Config, cluster: dict[str, float]) -> list[placement.Demand]:
    """`trial_bundles`, each with the config key that asks for each of its resources."""
    bundles = trial_bundles(cfg, cluster)
    clients = client_actor_count(cfg, cluster) if cfg.runtime == "ray" else 0
    demands = []
    for index, bundle in enumerate(bundles):
        is_client = 2 <= index < 2 + clients
        keys = {name: "server_accelerator" for name in bundle if name.startswith("accelerator")}
        keys |= {"CPU": "client_cpus", "GPU": "client_gpus" if is_client else "server_gpus"}
        demands.append((keys, bundle))
    return demands


def check_trials_fit(base: dict[str, Any], cluster: dict[str, float]) -> None:
    """Every trial's placement group fits the cluster (a ConfigError naming the key, else Tune
    would leave the trial pending for ever): the base config, and each value the search block
    gives a key that sizes the bundles."""
    from tune.space import trial_config

    search = base.get("search") or {}
    variants = [trial_config(base, {})]
    for key in RESOURCE_KEYS:
        for value in search_choices(search.get(key)):
            variants.append(trial_config(base, {key: value}))
    nodes = actors_runtime.cluster_nodes()
    for variant in variants:
        placement.check_fits(trial_demands(variant, cluster), nodes)


def pin_client_actors(cfg: Config, cluster: dict[str, float]) -> Config:
    """The trial's config with `num_client_actors` fixed to what its bundles hold."""
    if cfg.runtime != "ray" or cfg.num_client_actors:
        return cfg
    return cfg.replace(num_client_actors=client_actor_count(cfg, cluster))


def resources_for(
    base: dict[str, Any], cluster: dict[str, float]
) -> Callable[[dict[str, Any]], Any]:
    """Tune's per-trial resource callback: searched values can change runtime, GPUs or clients."""
    from ray import tune

    from tune.space import trial_config

    def resources(params: dict[str, Any]) -> Any:
        cfg = trial_config(base, params)
        return tune.PlacementGroupFactory(trial_bundles(cfg, cluster), strategy="PACK")

    return resources
