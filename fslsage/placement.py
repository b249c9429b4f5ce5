"""What a run's actors ask a Ray cluster for, and whether the cluster's nodes can hold them:
arithmetic on the config and the nodes' resources, no Ray (the Ray runtime checks it before it
starts an actor, a sweep sizes its trials with it, tests check the cluster configs against it).
Ray places a GPU share below 1 on one card, so shares are packed per card as Ray packs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fslsage.config import Config, ConfigError

EPS = 1e-9  # slack in resource arithmetic (Ray itself counts in units of 1e-4)


def server_cpus(cfg: Config) -> float:
    """The CPU the S-Server actor asks for: one where it works on a GPU (`server_gpus` > 0) — it
    makes every host↔device copy of the run's activations and gradients, which stall behind a
    client actor's training on a shared core — and none on a CPU-only run, where its compute
    shares the client actors' cores: a core of its own would cost a client actor (one of the
    two on the 2-core development machine). A Tune trial's S-Server bundle reserves one CPU
    either way (tune/resources.py)."""
    return 1.0 if cfg.server_gpus > 0 else 0.0


def replica_bundles(cfg: Config) -> int:
    """The stateless replicas that ask for resources (a GPU share each) and so get a bundle of
    their own in a Tune trial; replicas without a GPU ask for nothing."""
    return cfg.server_replicas if cfg.server_mode == "stateless" and cfg.server_gpus else 0


def server_demand(cfg: Config, cpus: float | None = None) -> dict[str, float]:
    """What the S-Server actor asks Ray for (`cpus`: instead of `server_cpus`)."""
    need = {"CPU": server_cpus(cfg) if cpus is None else cpus, "GPU": cfg.server_gpus}
    if cfg.server_accelerator:
        need[f"accelerator_type:{cfg.server_accelerator}"] = 0.001
    return need


@dataclass
class NodeLeft:
    """What is left of one node as actors are placed on it, the way Ray places them: a GPU share
    below 1 comes from one card (0.3 GPU per actor: 3 on a card, not 3.33), a whole number of
    GPUs from as many whole free cards."""

    cpus: float
    cards: list[float]  # each GPU's free share
    other: dict[str, float]

    @classmethod
    def of(cls, resources: Mapping[str, float]) -> NodeLeft:
        gpus = float(resources.get("GPU", 0.0))
        whole = int(gpus + EPS)
        cards = [1.0] * whole + ([gpus - whole] if gpus - whole > EPS else [])
        other = {k: float(v) for k, v in resources.items() if k not in ("CPU", "GPU")}
        return cls(float(resources.get("CPU", 0.0)), cards, other)

    def _cards_for(self, gpus: float) -> list[int] | None:
        """The cards an actor asking for `gpus` GPUs would take (a share: the fullest card
        that holds it); None where there is no room."""
        if gpus <= 0:
            return []
        if gpus < 1:
            fits = [i for i, free in enumerate(self.cards) if free + EPS >= gpus]
            return [min(fits, key=self.cards.__getitem__)] if fits else None
        whole = [i for i, free in enumerate(self.cards) if free + EPS >= 1.0]
        n = math.ceil(gpus - EPS)
        return whole[:n] if len(whole) >= n else None

    def take(self, need: Mapping[str, float]) -> bool:
        """Places one actor asking for `need` here, if it fits."""
        gpus, cpus = need.get("GPU", 0.0), need.get("CPU", 0.0)
        rest = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
        cards = self._cards_for(gpus)
        short = any(v > self.other.get(k, 0.0) + EPS for k, v in rest.items())
        if cards is None or cpus > self.cpus + EPS or short:
            return False
        for i in cards:
            self.cards[i] -= min(gpus, 1.0)
        self.cpus -= cpus
        for k, v in rest.items():
            self.other[k] -= v
        return True

    def count(self, cpus: float, gpus: float) -> int:
        """How many more actors of `cpus` CPUs (> 0) and `gpus` GPUs (at most 1) fit here."""
        n = int((self.cpus + EPS) // cpus)
        if 0 < gpus < 1:
            n = min(n, sum(int((free + EPS) // gpus) for free in self.cards))
        elif gpus >= 1:
            n = min(n, sum(1 for free in self.cards if free + EPS >= 1.0))
        return max(n, 0)


def client_actor_count(
    cfg: Config,
    nodes: Sequence[Mapping[str, float]] | Mapping[str, float],
    reserved_cpus: float | None = None,
) -> int:
    """`num_client_actors`, or as many as the cluster's `nodes` (their total resources; one
    mapping: a single node) hold next to the S-Server and its GPU replicas: per node, by its CPUs
    (one actor a core by default) and its cards (a GPU share comes from one card: 0.3 GPU fits
    3 on a card). The S-Server goes on the node that leaves the most room. Never more than
    there are clients, at least one. `reserved_cpus`: the S-Server's CPUs, if not
    `server_cpus(cfg)` (a Tune trial reserves one either way and pins the result, see
    tune/resources.py)."""
    n = cfg.num_client_actors
    if n == 0:
        nodes = [nodes] if isinstance(nodes, Mapping) else list(nodes)
        server, replica = server_demand(cfg, reserved_cpus), {"GPU": cfg.server_gpus}
        fits = [0]
        for at in range(len(nodes)):  # the S-Server on node `at`, the replicas where they fit
            left = [NodeLeft.of(node) for node in nodes]
            placed = left[at].take(server) and all(
                any(node.take(replica) for node in left) for _ in range(replica_bundles(cfg))
            )
            if placed:
                fits.append(sum(node.count(cfg.client_cpus, cfg.client_gpus) for node in left))
        n = max(fits)
    return max(1, min(n, cfg.num_clients))


Demand = tuple[dict[str, str], dict[str, float]]  # (resource → the config key asking, amounts)


def check_fits(demands: list[Demand], nodes: list[dict[str, float]]) -> None:
    """A ConfigError naming the key of the first demand (one actor's or bundle's resources)
    that no node can hold, or that with those before it exceeds what the cluster has in all:
    Ray would wait for it for ever (under Tune) instead of failing."""
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0.0) + amount
    used: dict[str, float] = {}
    for keys, amounts in demands:
        need = {name: amount for name, amount in amounts.items() if amount > 0}
        for name, amount in need.items():
            if not any(n.get(name, 0.0) + EPS >= amount for n in nodes):
                most = max((n.get(name, 0.0) for n in nodes), default=0.0)
                raise ConfigError(
                    keys[name], f"one actor asks for {amount:g} {_resource(name)}; no node of the "
                    f"cluster has that (the most on one node: {most:g})",
                )  # fmt: skip
        if not any(all(n.get(k, 0.0) + EPS >= v for k, v in need.items()) for n in nodes):
            asked = ", ".join(f"{v:g} {_resource(k)}" for k, v in need.items())
            raise ConfigError(keys[next(iter(need))], f"one actor asks for {asked}; no node of "
                                                      "the cluster has all of that")  # fmt: skip
        for name, amount in need.items():
            used[name] = used.get(name, 0.0) + amount
            if used[name] > totals.get(name, 0.0) + EPS:
                raise ConfigError(
                    keys[name], f"the run's actors ask for {used[name]:g} {_resource(name)} in "
                    f"all (at least), the cluster has {totals.get(name, 0.0):g}",
                )  # fmt: skip
    _check_cards(demands, nodes)


def _check_cards(demands: list[Demand], nodes: list[dict[str, float]]) -> None:
    """GPU shares below 1 each come from one card (`NodeLeft`): actors of share s fit at most
    floor(1 / s) to a card, on the cards that actors asking for whole GPUs leave. (A bound that
    holds whatever Ray's choices; shares of different sizes that do not pack together can still
    leave an actor unplaced.)"""
    cards = sum(len(NodeLeft.of(node).cards) for node in nodes)
    cards -= sum(math.ceil(a.get("GPU", 0.0) - EPS) for _, a in demands if a.get("GPU", 0.0) >= 1)
    shares: dict[float, tuple[int, str]] = {}
    for keys, amounts in demands:
        share = amounts.get("GPU", 0.0)
        if 0 < share < 1:
            n, _ = shares.get(share, (0, keys["GPU"]))
            shares[share] = (n + 1, keys["GPU"])
    for share, (n, key) in shares.items():
        per_card = int((1.0 + EPS) // share)
        if n > max(cards, 0) * per_card:
            raise ConfigError(
                key, f"{n} actors ask for {share:g} GPU each: a share comes from one card, "
                f"{per_card} to a card, and the cluster has {max(cards, 0)} cards for them",
            )  # fmt: skip


def _resource(name: str) -> str:
    return name.removeprefix("accelerator_type:") + " accelerator" if ":" in name else name


def actor_demands(cfg: Config, num_client_actors: int) -> list[Demand]:
    """What the runtime's actors ask Ray for: the S-Server, the client actors, the replicas."""
    server = server_demand(cfg)
    keys = {"GPU": "server_gpus", "CPU": "server_gpus"}  # its CPU: where it has a GPU
    if cfg.server_accelerator:
        keys[f"accelerator_type:{cfg.server_accelerator}"] = "server_accelerator"
    client = ({"CPU": "client_cpus", "GPU": "client_gpus"},
              {"CPU": cfg.client_cpus, "GPU": cfg.client_gpus})  # fmt: skip
    replicas = cfg.server_replicas if cfg.server_mode == "stateless" else 0
    return [
        (keys, server),
        *[client] * num_client_actors,
        *[({"GPU": "server_gpus"}, {"GPU": cfg.server_gpus})] * replicas,
    ]
