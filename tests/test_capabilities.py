"""What an algorithm or its S-Server declares, and the runtimes, the clock and the config honour
without naming the algorithm: batched request handlers (`Server.batch_handler`), the relay's
stages (`Algorithm.round_stages`), its own metric columns and its need of class labels."""

from __future__ import annotations

import pytest
import torch
from helpers import demo_config, synchronous_algorithms
from test_ray_runtime import COALESCING

from fslsage import experiment
from fslsage.algorithms import ALGORITHMS, build_algorithm
from fslsage.algorithms.base import ClientReport, Server
from fslsage.algorithms.cse_fsl import CSEFSL
from fslsage.algorithms.sl import SplitLearning
from fslsage.algorithms.splitfed_v2 import SharedServer, SplitFedV2
from fslsage.config import ConfigError
from fslsage.data import describe_dataset
from fslsage.dryrun import planned_clock
from fslsage.experiment import LocalRuntime, RoundOutcome, prepare, run_experiment
from fslsage.ledger import Ledger

KINDS = ("upload", "exchange", "align", "gradient")


def new_server(algorithm: str, **overrides) -> Server | None:
    cfg = demo_config(algorithm=algorithm, num_clients=4, **overrides)
    return build_algorithm(cfg, describe_dataset(cfg.dataset)).new_server(torch.device("cpu"))


# ----------------------------------------------------------------------------- batched handlers
def test_the_coalesce_test_covers_every_batched_handler():
    """The S-Server coalesces exactly the kinds a server has `on_<kind>_batch` for; the Ray test
    of `coalesce` runs each of them (a new one joins it here)."""
    batched = set()
    for name in ALGORITHMS.names():
        server = new_server(name)
        batched |= {(name, k) for k in KINDS if server and server.batch_handler(k) is not None}
    assert batched == set(COALESCING)
    assert new_server("splitfed_v2", server_mode="stateless").batch_handler("exchange") is None


def test_only_the_class_that_defines_a_handler_can_batch_it():
    """A server that brings its own `on_<kind>_batch` is coalesced, whatever its class; one that
    changes `on_<kind>` without its batch twin is served one request at a time."""

    class Doubling(Server):
        def on_exchange(self, cid, z, y):
            return 2 * z, z.sum()

        def on_exchange_batch(self, requests):
            return [self.on_exchange(*r) for r in requests]

    class Changed(SharedServer):
        def on_exchange(self, cid, z, y):
            return super().on_exchange(cid, z, 2 * y)

    cfg = demo_config()
    model = torch.nn.Linear(3, 2)
    doubling = Doubling(model, cfg, 2)
    assert doubling.batch_handler("exchange") == doubling.on_exchange_batch
    assert doubling.batch_handler("upload") is None
    assert Changed(model, cfg, 2).batch_handler("exchange") is None
    assert SharedServer(model, cfg, 2).batch_handler("exchange") is not None
    assert all(Server(model, cfg, 2).batch_handler(k) is None for k in KINDS)


# ----------------------------------------------------------------------------- the relay
def test_sl_relays_one_client_at_a_time_and_the_others_run_side_by_side():
    cids = [0, 1, 2, 3]
    sl = ALGORITHMS.get("sl")
    assert sl is SplitLearning and sl.round_stages(None, cids) == [[0], [1], [2], [3]]
    for name in synchronous_algorithms():
        if name != "sl":
            assert ALGORITHMS.get(name).round_stages(None, cids) == [cids], name


def two_stages(self, cids):
    return [cids[:2], cids[2:]]


def test_the_local_runtime_starts_each_stage_from_the_one_before(monkeypatch):
    """Clients of the first stage start from the global weights, those of the next from what
    the first stage's last client handed on."""
    monkeypatch.setattr(SplitFedV2, "round_stages", two_stages)
    runtime = LocalRuntime(prepare(demo_config(algorithm="splitfed_v2", num_clients=4)))
    started: dict[int, object] = {}

    def fake_round(algo, client, shard, t, weights, send):
        started[client.cid] = weights
        copy = {p: {k: v.clone() for k, v in s.items()} for p, s in weights.items()}
        return ClientReport(client.cid, len(shard), copy, 0.0)

    monkeypatch.setattr(experiment, "run_client_round", fake_round)
    global_weights = runtime.global_weights
    try:
        runtime.run_round(1)
    finally:
        runtime.close()
    assert started[0] is global_weights and started[1] is global_weights
    assert started[2] is started[3] and started[2] is not global_weights


def test_the_clock_adds_up_each_stages_slowest_client(monkeypatch):
    monkeypatch.setattr(SplitFedV2, "round_stages", two_stages)
    cfg = demo_config(algorithm="splitfed_v2", num_clients=4, network="wireless")
    clock, ledger = planned_clock(cfg), Ledger()
    own = [clock.client_seconds(1, cid, {}) for cid in range(4)]
    assert len(set(own)) == 4  # unequal clients, or the test shows nothing
    want = max(own[:2]) + max(own[2:]) + clock.server_seconds(1)
    assert clock.round_seconds(1, ledger) == pytest.approx(want)


# ----------------------------------------------------------------------------- metric columns
class FixedRuntime:
    """Rounds that log `metrics` at the S-Server, without training."""

    def __init__(self, metrics: dict[str, float]):
        self.metrics = metrics

    def start_round(self, t: int) -> None: ...
    def run_round(self, t: int, checkpoint: bool = False) -> RoundOutcome:
        return RoundOutcome(1.0, [], dict(self.metrics))

    def evaluate(self) -> tuple[float, float]:
        return 0.5, 0.75

    def close(self) -> None: ...


def test_an_algorithm_names_its_own_metric_columns(monkeypatch):
    metrics = {"align_loss": 0.125, "server_loss": 0.25}
    cfg = demo_config(algorithm="cse_fsl", rounds=2)
    rows = run_experiment(cfg, FixedRuntime(metrics), progress=None)
    assert "server_loss" not in rows and "align_loss" not in rows
    monkeypatch.setattr(CSEFSL, "metric_columns", ("server_loss",))
    rows = run_experiment(cfg, FixedRuntime(metrics), progress=None)
    assert rows["server_loss"].tolist() == [0.25, 0.25] and "align_loss" not in rows
    rows = run_experiment(cfg.replace(algorithm="fsl_sage"), FixedRuntime({}), progress=None)
    assert rows["align_loss"].isna().all()  # a round without alignment: NaN


def test_an_algorithm_that_needs_class_labels_refuses_a_language_dataset(monkeypatch):
    with pytest.raises(ConfigError, match="gas needs class labels; e2e is"):
        demo_config(algorithm="gas", dataset="e2e", model="gpt2")
    demo_config(algorithm="splitfed_v2", dataset="e2e", model="gpt2")
    monkeypatch.setattr(SplitFedV2, "needs_class_labels", True)
    with pytest.raises(ConfigError, match="splitfed_v2 needs class labels; e2e is"):
        demo_config(algorithm="splitfed_v2", dataset="e2e", model="gpt2")


def test_network_auto_is_the_network_an_algorithm_asks_for(monkeypatch):
    assert demo_config(algorithm="gas").network_profile == "wireless"
    assert demo_config(algorithm="splitfed_v2").network_profile == "equal"
    monkeypatch.setattr(SplitFedV2, "network", "wireless")
    assert demo_config(algorithm="splitfed_v2").network_profile == "wireless"
    sweep = demo_config(search={"algorithm": ["fedavg", "sl"]})  # sl is a SplitFedV2
    assert sweep.network_profile == "wireless"


def test_stateless_servers_publish_and_no_other_does():
    assert new_server("splitfed_v2", server_mode="stateless").publishes
    assert not any(s is not None and s.publishes for s in map(new_server, ALGORITHMS.names()))
