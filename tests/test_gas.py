"""GAS (SPEC §2): label-wise activation statistics and generated activations, the S-Server's
logit-adjusted answers and buffered steps, the simulated-time schedule, and whole runs on both
runtimes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from helpers import demo_config
from test_ray_runtime import assert_same_metrics, run_local, run_ray, run_ray_through_client_crash

from actors.client_pool import ClientActor
from actors.common import DataBundle, pack
from fslsage.algorithms.base import loss_fn
from fslsage.algorithms.gas import ActivationStats, AsyncSchedule, GenerativeServer
from fslsage.config import ConfigError, validate
from fslsage.dryrun import planned_async, planned_ledger, planned_rounds, traffic_sizes
from fslsage.experiment import LocalRuntime, async_schedule, prepare, run_experiment
from fslsage.ledger import Ledger


def gas_config(**overrides):
    base = {"algorithm": "gas", "local_iters": 4, "model_buffer": 3, "activation_buffer": 2,
            "network": "wireless", "rounds": 3}  # fmt: skip
    return demo_config(**{**base, **overrides})


@pytest.mark.parametrize("diagonal", [False, True])
def test_activation_stats_merge_batches_like_one_pass(diagonal):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 5, generator=g) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    y = torch.randint(0, 3, (300,), generator=g)
    stats = ActivationStats(3, 5, diagonal, torch.device("cpu"))
    for chunk in range(0, 300, 37):  # uneven batches, labels spread over them
        stats.update(z[chunk : chunk + 37], y[chunk : chunk + 37])
    for c in range(3):
        x = z[y == c].double()
        assert stats.count[c] == len(x)
        assert stats.mean[c].double() == pytest.approx(x.mean(0), abs=1e-4)
        cov = torch.cov(x.T)
        expected = cov.diagonal() if diagonal else cov
        got = stats.scatter[c].double() / (len(x) - 1)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_generated_activations_follow_the_label_gaussian():
    g = torch.Generator().manual_seed(1)
    mix = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # correlated dimensions
    z = torch.randn(4000, 2, generator=g) @ mix + torch.tensor([3.0, -2.0])
    stats = ActivationStats(1, 2, False, torch.device("cpu"))
    stats.update(z, torch.zeros(4000, dtype=torch.long))
    drawn = stats.sample(0, 20000, torch.Generator().manual_seed(2))
    assert drawn.mean(0) == pytest.approx([3.0, -2.0], abs=0.03)
    assert torch.allclose(torch.cov(drawn.T), mix.T @ mix, atol=0.05)


@pytest.mark.parametrize("diagonal", [False, True])
def test_labels_are_drawn_together_each_from_its_own_gaussian(diagonal):
    """One batched factorisation for every label that needs samples, the rows label by label."""
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, -10.0]])
    y = torch.randint(0, 3, (3000,), generator=g)
    z = torch.randn(3000, 2, generator=g) * torch.tensor([1.0, 2.0]) + centres[y]
    stats = ActivationStats(3, 2, diagonal, torch.device("cpu"))
    stats.update(z, y)
    drawn = stats.sample_labels([4000, 0, 6000], torch.Generator().manual_seed(4))
    assert drawn.shape == (10000, 2)
    for block, c in ((drawn[:4000], 0), (drawn[4000:], 2)):
        assert block.mean(0) == pytest.approx(centres[c].tolist(), abs=0.1)
        assert block.std(0) == pytest.approx([1.0, 2.0], abs=0.1)


def make_server(**cfg_changes) -> GenerativeServer:
    cfg = gas_config(**cfg_changes)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    return GenerativeServer(model, cfg, num_clients=2, num_classes=3, cut=(2, 3))


def test_exchange_answers_the_logit_adjusted_gradient_and_steps_on_the_buffer():
    server = make_server(activation_buffer=2, per_label=4, batch_size=4)
    server.set_label_counts(np.array([[8, 2, 0], [1, 1, 1]]))
    before = [p.detach().clone() for p in server.model.parameters()]
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(4, 2, 3, generator=g), torch.tensor([0, 0, 1, 0])

    grad, loss = server.on_exchange(0, z, y)
    leaf = z.clone().requires_grad_(True)
    prior = torch.tensor([0.8, 0.2, 1e-8]).log()
    expected_loss = loss_fn(server.model(leaf) + prior, y)
    (expected,) = torch.autograd.grad(expected_loss, leaf)
    assert torch.allclose(grad, expected) and float(loss) == pytest.approx(expected_loss.item())
    assert all(torch.equal(a, b) for a, b in zip(before, server.model.parameters(), strict=True))

    z2, y2 = torch.randn(4, 2, 3, generator=g), torch.tensor([1, 2, 0, 0])
    server.on_exchange(1, z2, y2)  # the second batch fills the buffer: one step
    assert server.buffer == []
    assert not all(
        torch.equal(a, b) for a, b in zip(before, server.model.parameters(), strict=True)
    )
    # real per label: 0 → 5, 1 → 2, 2 → 1; label 2 has one sample (no Gaussian yet): only
    # label 1 is topped up, by 4 − 2
    metrics = server.end_round(1)
    assert metrics["generated"] == 2
    assert stats_counts(server) == [5, 2, 1]


def stats_counts(server: GenerativeServer) -> list[int]:
    return [int(c) for c in server.stats.count]


def test_server_lr_decays_with_the_global_iteration():
    server = make_server(server_lr_decay=True)
    server.decay_lr(4)
    assert server.opt.param_groups[0]["lr"] == pytest.approx(server.cfg.lr / 2)


def run_schedule(speeds: list[float], **cfg) -> tuple[AsyncSchedule, list[list]]:
    """A schedule where client i's step takes speeds[i] seconds; start and finish take none."""
    config = gas_config(num_clients=len(speeds), **cfg)

    def seconds(cid: int, event: str, batch: int) -> float:
        return speeds[cid] if event == "step" else 0.0

    schedule = AsyncSchedule(config, [64] * len(speeds), seconds)
    iterations, schedule.ends = [], []
    for _ in range(3):
        iterations.append(list(schedule.global_iteration()))
        schedule.ends.append(schedule.now)
    return schedule, iterations


def test_schedule_advances_the_client_with_the_smallest_clock():
    schedule, iterations = run_schedule([1.0, 3.0, 10.0], local_iters=2, model_buffer=2)
    # all free at 0 (ties go by id); then client 0 (free at 1, 2, 3 ...) outpaces 1 (free at 3)
    # and 2 (at 10); having finished, it is the only idle client, so it replaces itself
    assert iterations[0] == [
        ("start", 0, 0), ("start", 1, 0), ("start", 2, 0),
        ("step", 0, 32), ("step", 1, 32), ("step", 2, 32), ("step", 0, 32), ("finish", 0, 0),
        ("start", 0, 0), ("step", 0, 32), ("step", 0, 32), ("finish", 0, 0),
    ]  # fmt: skip
    finishes = [[cid for kind, cid, _ in it if kind == "finish"] for it in iterations]
    assert all(len(f) == 2 for f in finishes)  # model_buffer uploads per global iteration
    assert len(schedule.active) == 3  # a finished client is always replaced
    assert schedule.now > 0 and all(c >= 0 for c in schedule.clock)
    assert all(batch == 32 for it in iterations for kind, _, batch in it if kind == "step")


def test_a_replacement_starts_at_the_handover_time():
    schedule, iterations = run_schedule([1.0, 1.0, 1.0, 1.0], active_clients=2, local_iters=3,
                                        model_buffer=1)  # fmt: skip
    assert len(schedule.active) == 2
    started = [cid for it in iterations for kind, cid, _ in it if kind == "start"]
    assert len(started) == 2 + 2  # two at first, then one per finish (the last not yet begun)
    assert len(schedule.starting) == 1
    # equal speeds: both first clients finish at 3 s (one per global iteration); their
    # replacements start at 3 s, not at 0, so the next finish is at 6 s
    assert schedule.ends == pytest.approx([3.0, 3.0, 6.0])


def test_gas_run_learns_and_books_what_the_dry_run_plans():
    cfg = gas_config(rounds=6, local_iters=5, model_buffer=4, activation_buffer=4)
    df = run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)
    assert df.test_acc.iloc[-1] > 0.7, df.to_string()
    planned = planned_rounds(cfg)
    assert df.sim_time_s.tolist() == pytest.approx([r["sim_time_s"] for r in planned])
    assert df.sim_time_s.is_monotonic_increasing
    assert df.comm_gib.tolist() == pytest.approx(
        np.cumsum([(r["up_bytes"] + r["down_bytes"]) / 2**30 for r in planned]).tolist()
    )


def test_gas_ledger_per_global_iteration():
    cfg = gas_config(rounds=2, batch_size=50)
    runtime = LocalRuntime(prepare(cfg))
    measured = Ledger()
    for t in (1, 2):
        measured.merge(runtime.run_round(t).ledger)
    planned = planned_ledger(cfg)
    model = traffic_sizes(cfg).part_bytes["client_model"]
    for t in (1, 2):
        kinds = measured.round_summary(t)["by_kind"]
        assert kinds == planned.round_summary(t)["by_kind"]
        assert kinds["activations"]["up"] == kinds["gradients"]["down"]  # an answer per step
        assert kinds["client_model"]["up"] == cfg.model_buffer * model  # the model buffer
    # round 1: every client fetches the model at the start, and each replacement once more
    assert (
        measured.round_summary(1)["by_kind"]["client_model"]["down"]
        == (cfg.num_clients + cfg.model_buffer - 1) * model
    )
    assert all(s > 0 for s in planned_async(cfg)[1])


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"active_clients": 9}, "active_clients", "at most num_clients=8"),
        ({"local_iters": 0}, "local_iters", "must be >= 1"),
    ],
)
def test_bad_gas_config_names_the_key(changes, key, words):
    with pytest.raises(ConfigError) as e:
        gas_config(**changes)
    assert e.value.key == key and words in str(e.value)


def test_gas_needs_class_labels():
    with pytest.raises(ConfigError) as e:
        validate({"algorithm": "gas", "dataset": "e2e", "model": "gpt2",
                  "model_args": {"n_layer": 2, "n_embd": 8, "n_head": 2}})  # fmt: skip
    assert e.value.key == "algorithm" and "class labels" in str(e.value)


@pytest.mark.parametrize(("setting", "dim", "diagonal"),
                         [("auto", 6, False), ("auto", 2048, True), ("diag", 6, True),
                          ("full", 2048, False)])  # fmt: skip
def test_covariance_kind(setting, dim, diagonal):
    cfg = gas_config(activation_covariance=setting)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(dim, 3))
    server = GenerativeServer(model, cfg, num_clients=2, num_classes=3, cut=(dim,))
    assert server.stats.diagonal == diagonal


# ----------------------------------------------------------------------------- on Ray
def test_gas_on_ray_reproduces_the_local_run_through_a_killed_client_actor(ray_session, tmp_path):
    """Client actors play their clients' schedule events, the S-Server (`exact`) answers the
    steps in the schedule's order: the in-process metrics, to 1e-6. A client actor dies in the
    middle of global iteration 2, its clients half-way through an epoch of their minibatch
    streams: the run goes back to iteration 1's checkpoint (clients, streams, S-Server,
    schedule) and each iteration is reported once."""
    cfg = gas_config(rounds=3, checkpoint_every=1, server_lr_decay=True)
    schedule = async_schedule(cfg, [len(i) for i in prepare(cfg).client_indices])
    list(schedule.global_iteration())
    second = list(schedule.global_iteration())

    def second_to_act(owned: list[int]) -> int:
        """The actor's second client to act in iteration 2: it dies after serving the first."""
        return list(dict.fromkeys(cid for _, cid, _ in second if cid in owned))[1]

    ray_df = run_ray_through_client_crash(ray_session, cfg, tmp_path / "ray", 0, 2, second_to_act)
    assert ray_df["round"].tolist() == [1, 2, 3]
    local = run_local(cfg, tmp_path / "local")
    assert_same_metrics(local, ray_df)
    assert (local["train_loss"] - ray_df["train_loss"]).abs().max() <= 1e-6


def test_gas_on_ray_with_coalesce_serves_in_arrival_order(ray_session, tmp_path):
    """`coalesce`: the S-Server answers whichever step arrives first — the metrics may differ
    from the in-process run's, the traffic and simulated time (set by the schedule) do not."""
    cfg = gas_config(rounds=2, server_batching="coalesce")
    ray_df, _ = run_ray(cfg, tmp_path / "ray")
    local = run_local(cfg, tmp_path / "local")
    assert ray_df["round"].tolist() == [1, 2]
    assert ray_df.comm_gib.tolist() == pytest.approx(local.comm_gib.tolist())
    assert ray_df.sim_time_s.tolist() == pytest.approx(local.sim_time_s.tolist())
    assert (ray_df.test_acc > 0.5).all(), ray_df.to_string()


class PairedExchanges:
    """Stands in for the S-Server's actor handle (`submit.remote`) for two clients: an exchange
    is answered (a zero gradient, as an object reference like Ray's) only once the other client
    has sent its own, so a client actor that waited for one client's answer before the other
    client's forward pass would never get one. `fail_cid`'s first exchange raises instead."""

    def __init__(self, ray, fail_cid: int | None = None):
        self.ray, self.fail_cid = ray, fail_cid
        self.meet = threading.Barrier(2, timeout=20)
        self.arrivals: list[int] = []
        self.submit = self

    def remote(self, epoch, cid, seq, kind, *args, done=()):
        if kind != "exchange":
            return None
        self.arrivals.append(cid)
        if cid == self.fail_cid:
            raise RuntimeError(f"client {cid}'s exchange failed")
        self.meet.wait()  # both clients have a request waiting
        z, _ = args
        return self.ray.put(pack((np.zeros_like(z), np.float32(1.0))))


def interleaved_events(cids: tuple[int, int], steps: int) -> list[tuple[int, str, int]]:
    a, b = cids
    kinds = [("start", a), ("start", b), *[("step", c) for _ in range(steps) for c in (a, b)],
             ("finish", a), ("finish", b)]  # fmt: skip
    return [(index, kind, cid) for index, (kind, cid) in enumerate(kinds)]


def test_a_client_actor_plays_its_clients_concurrently(ray_session):
    """Two clients of one actor take turns at the S-Server: each one's request is sent while the
    other still waits for its answer. The summary lists the steps and the finished clients'
    reports in schedule order, and their models come back as objects of their own."""
    prepared = prepare(gas_config(num_clients=4))
    server = PairedExchanges(ray_session)
    actor = ClientActor(prepared.algorithm, DataBundle.of(prepared), [0, 2], server, channel=False)
    events = interleaved_events((0, 2), steps=3)
    summary, *models = actor.run_global_iteration(1, 1, prepared.algorithm.initial_global(), events)
    assert sorted(server.arrivals) == [0, 0, 0, 2, 2, 2]
    assert [index for index, _ in summary["losses"]] == list(range(2, 8))
    assert [report.cid for report in summary["reports"]] == [0, 2]
    assert len(models) == 2 and all(set(m) == {"client_model"} for m in models)
    models_moved = sorted((cid, kind, way) for (_, cid, kind, way), _ in summary["ledger"]
                          if kind == "client_model")  # fmt: skip
    assert models_moved == [(c, "client_model", w) for c in (0, 2) for w in ("down", "up")]


def test_a_failing_client_fails_its_actors_call_while_the_other_still_waits(ray_session):
    """One client's request raises while the actor's other client waits for an answer that
    needs it: the call raises that error at once instead of waiting for every client."""
    prepared = prepare(gas_config(num_clients=4))
    server = PairedExchanges(ray_session, fail_cid=2)
    actor = ClientActor(prepared.algorithm, DataBundle.of(prepared), [0, 2], server, channel=False)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="client 2's exchange failed"):
        actor.run_global_iteration(1, 1, prepared.algorithm.initial_global(),
                                   interleaved_events((0, 2), steps=2))  # fmt: skip
    assert time.monotonic() - began < 15  # client 0 still waits (20 s) at the barrier
    server.meet.abort()  # lets client 0's thread go
