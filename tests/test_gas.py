"""GAS (SPEC §2): label-wise activation statistics and generated activations, the S-Server's
logit-adjusted answers and buffered steps, the simulated-time schedule, and whole runs on both
runtimes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, demo_config
from test_ray_runtime import assert_same_metrics, run_local, run_ray, run_ray_through_client_crash

from actors.client_pool import ClientActor
from actors.common import DataBundle, pack
from fslsage.algorithms.base import ClientReport, loss_fn
from fslsage.algorithms.gas import (
    ActivationStats,
    AsyncSchedule,
    GenerativeServer,
    Rotation,
    event_seconds,
)
from fslsage.config import ConfigError, load_config, validate
from fslsage.data import CLASSIFICATION, DatasetInfo, client_sizes, label_histogram, partition
from fslsage.dryrun import (
    meta_algorithm,
    planned_async,
    planned_client_sizes,
    planned_clock,
    planned_ledger,
    planned_rounds,
    traffic_sizes,
)
from fslsage.experiment import LocalRuntime, async_schedule, prepare, run_experiment
from fslsage.ledger import Ledger
from fslsage.models import build_model, cut_shape


def gas_config(**overrides):
    base = {"algorithm": "gas", "local_iters": 4, "model_buffer": 3, "activation_buffer": 2,
            "network": "wireless", "rounds": 3}  # fmt: skip
    return demo_config(**{**base, **overrides})


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("diagonal", [False, True])
def test_activation_stats_merge_batches_like_one_pass(diagonal, weighted):
    """Batch by batch, the label-wise weighted mean and (biased) covariance of all rows so far,
    plus the ridge: 1e-5 at every merge after a label's first, decayed by d = W / (W + m) as the
    covariance is. Weights 1 (`count`) or per row (`progress`)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 5, generator=g) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    y = torch.randint(0, 3, (300,), generator=g)
    w = torch.randint(1, 50, (300,), generator=g).float() if weighted else torch.ones(300)
    stats = ActivationStats(3, 5, diagonal, torch.device("cpu"))
    ridge, merged = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in range(0, 300, 37):  # uneven batches, labels spread over them
        rows = slice(chunk, chunk + 37)
        stats.update(z[rows], y[rows], w[rows] if weighted else None)
        for c in range(3):
            m = float(w[rows][y[rows] == c].sum())
            if m > 0 and merged[c] > 0:
                ridge[c] = ridge[c] * merged[c] / (merged[c] + m) + 1e-5
            merged[c] += m
    for c in range(3):
        x, wc = z[y == c].double(), w[y == c].double()
        assert float(stats.weight[c]) == pytest.approx(float(wc.sum()))
        mean = (wc[:, None] * x).sum(0) / wc.sum()
        assert stats.mean[c].double() == pytest.approx(mean, abs=1e-4)
        cov = torch.cov(x.T, correction=0, aweights=wc) + ridge[c] * torch.eye(5)
        expected = cov.diagonal() if diagonal else cov
        assert torch.allclose(stats.cov[c].double(), expected, rtol=1e-4, atol=1e-4)


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
    # real per label: 0 → 5, 1 → 2, 2 → 1 (each client's first step: weight 1); every label
    # has statistics now, so every label is topped up to 4 (label 2 from its one sample's
    # zero covariance, factored with the 1e-6·I retry): 0 + 2 + 3
    metrics = server.end_round(1)
    assert metrics["generated"] == 5
    assert stats_weights(server) == [5, 2, 1]


def stats_weights(server: GenerativeServer) -> list[float]:
    return [float(c) for c in server.stats.weight]


def test_no_activation_is_generated_before_every_label_has_statistics():
    """As the authors' code: a label without statistics holds back the generation of all."""
    server = make_server(activation_buffer=1, per_label=4, batch_size=4)
    g = torch.Generator().manual_seed(5)
    server.on_exchange(0, torch.randn(4, 2, 3, generator=g), torch.tensor([0, 0, 1, 1]))
    server.on_exchange(1, torch.randn(4, 2, 3, generator=g), torch.tensor([0, 1, 1, 1]))
    assert server.end_round(1)["generated"] == 0  # label 2 not seen yet: none generated
    server.on_exchange(0, torch.randn(4, 2, 3, generator=g), torch.tensor([2, 0, 0, 0]))
    assert server.end_round(2)["generated"] == 1 + 4 + 3  # every label up to 4


def test_server_lr_decays_with_the_global_iteration():
    server = make_server(server_lr_decay=True)
    server.decay_lr(4)
    assert server.opt.param_groups[0]["lr"] == pytest.approx(server.cfg.lr / 2)


def run_schedule(speeds: list[float], **cfg) -> tuple[AsyncSchedule, list[list]]:
    """A schedule where client i's step takes speeds[i] seconds; start and finish take none, and
    so do a step's forward pass and upload: a step's activations arrive as it begins."""
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


# ----------------------------------------------------------------------------- the authors' code
# github eejiarong/GAS, utils/network.py: AlexNetDownCifar / AlexNetUpCifar(num_classes=10)
# (counted by building them; the client's also in GAS_main.py: model_volume = 620544 bits / 32)
REFERENCE_CLIENT_PARAMS = {(3, 32, 32): 19392, (1, 28, 28): 18816}
REFERENCE_SERVER_PARAMS = 3849354
REFERENCE_CUT = {(3, 32, 32): (64, 8, 8), (1, 28, 28): (64, 7, 7)}


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_alexnet_gas_is_the_authors_split(shape):
    """Parameter counts and cut shape of the authors' split; pooling before ReLU, no ReLU after
    the server's first two convs nor between its fc layers, a 3×3/2 max-pool on the server."""
    info = DatasetInfo("x", CLASSIFICATION, 10, shape, 100, 10)
    split = build_model("alexnet_gas", info)
    assert param_count(split.client) == REFERENCE_CLIENT_PARAMS[shape]
    assert param_count(split.server) == REFERENCE_SERVER_PARAMS
    assert cut_shape(split, info) == REFERENCE_CUT[shape]
    layout = [type(m).__name__ for m in split.client]
    assert layout == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU"]
    layout = [type(m).__name__ for m in split.server.modules() if not list(m.children())]
    assert layout == ["Conv2d", "Conv2d", "Conv2d", "MaxPool2d", "ReLU", "Flatten",
                      "Linear", "Linear", "Linear"]  # fmt: skip
    pool = split.server.features[3]
    assert (pool.kernel_size, pool.stride) == (3, 2)
    assert split.server(torch.zeros(2, *REFERENCE_CUT[shape])).shape == (2, 10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_progress_weighted_statistics_by_hand(diagonal):
    """The authors' merge on one label, one feature. Rows 0 and 3 of weights 1 and 2: mean
    (0 + 6) / 3 = 2, covariance (1·4 + 2·1) / 3 = 2, taken as they are (first merge, no ridge).
    Then row 6 of weight 3: d = 3 / 6, mean ½·2 + ½·6 = 4, covariance
    ½·(2 + (4 − 2)²) + ½·(0 + (4 − 6)²) + 1e-5 = 5 + 1e-5. Unweighted (`count`) the same rows
    give mean 3 and covariance ⅔·(2.25 + 1.5²) + ⅓·(0 + 3²) + 1e-5 = 6 + 1e-5."""
    for weights, mean, cov in (([1.0, 2.0, 3.0], 4.0, 5.0), (None, 3.0, 6.0)):
        stats = ActivationStats(1, 1, diagonal, torch.device("cpu"))
        w = torch.tensor(weights) if weights else None
        stats.update(torch.tensor([[0.0], [3.0]]), torch.zeros(2, dtype=torch.long),
                     None if w is None else w[:2])  # fmt: skip
        if w is not None:
            assert float(stats.mean.flatten()[0]) == pytest.approx(2.0)
            assert float(stats.cov.flatten()[0]) == pytest.approx(2.0)
        stats.update(torch.tensor([[6.0]]), torch.zeros(1, dtype=torch.long),
                     None if w is None else w[2:])  # fmt: skip
        assert float(stats.weight[0]) == (6.0 if w is not None else 3.0)
        assert float(stats.mean.flatten()[0]) == pytest.approx(mean)
        assert float(stats.cov.flatten()[0]) == pytest.approx(cov + 1e-5, abs=1e-6)


def progress_server(**cfg_changes) -> GenerativeServer:
    cfg = gas_config(num_clients=3, active_clients=2, local_iters=2, model_buffer=1,
                     activation_buffer=2, per_label=1, batch_size=4, **cfg_changes)  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    return GenerativeServer(model, cfg, num_clients=3, num_classes=3, cut=(2, 3))


@pytest.mark.parametrize("weighting", ["progress", "count"])
def test_the_server_weighs_activations_by_their_clients_progress(weighting):
    """The authors' weights (GAS_main.py: weight_count, total_weight_count): a client's count
    starts at 1 and goes up by one per step; at the end of a global iteration (here: each
    finish, model_buffer 1) the base count grows by the server steps so far, and the
    replacement (the one idle client, never the finished one) starts at the base.
    Active a, b, idle c; one row per step, a server step every two steps:
      a:1  b:1 | a:2 (a done: base 1 + 1 = 2, c starts at 2)  b:2 | (b done: base 2 + 2 = 4,
      a starts at 4)  c:2  c:3 | (c done: base 4 + 3 = 7, b starts at 7)  a:4  b:7 |"""
    server = progress_server(activation_weighting=weighting)
    a, b = server.rotation.active
    (c,) = {0, 1, 2} - {a, b}
    seen, update = [], server.stats.update
    server.stats.update = lambda z, y, w: seen.append(w.tolist()) or update(z, y, w)
    g = torch.Generator().manual_seed(6)
    for cid in (a, b, a, b, c, c, a, b):
        server.on_exchange(cid, torch.randn(1, 2, 3, generator=g), torch.tensor([cid]))
    expected = [[1, 1], [2, 2], [2, 3], [4, 7]] if weighting == "progress" else [[1, 1]] * 4
    assert seen == expected
    assert server.base_progress == 7 and sorted(server.rotation.active) == sorted([a, b])


def test_full_covariance_factors_in_one_batch_and_retry_like_the_authors_code(monkeypatch):
    """utils.py's try_multivariate_normal: a covariance that is not positive definite is
    factored again with 1e-6·I, then 1e-5·I, ... added. One batched Cholesky for every label
    that needs samples, then one for those that failed, and so on."""
    stats = ActivationStats(3, 2, False, torch.device("cpu"))
    stats.cov[0] = torch.zeros(2, 2)  # a label seen once: no spread at all
    stats.cov[1] = torch.tensor([[4.0, 2.0], [2.0, 5.0]])  # L = [[2, 0], [1, 2]]
    stats.cov[2] = torch.diag(torch.tensor([-5e-6, 1.0]))  # fails with 1e-6, not with 1e-5
    calls, cholesky = [], torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda a, **kw: calls.append(len(a)) or cholesky(a, **kw))  # fmt: skip
    factor = stats.factors([0, 1, 2])
    assert calls == [3, 2, 1]
    assert torch.allclose(factor[0], 1e-3 * torch.eye(2))
    assert torch.allclose(factor[1], torch.tensor([[2.0, 0.0], [1.0, 2.0]]))
    expected = torch.diag(torch.tensor([5e-6, 1 + 1e-5]).sqrt())
    assert torch.allclose(factor[2], expected, rtol=1e-4, atol=1e-7)
    diagonal = ActivationStats(1, 2, True, torch.device("cpu"))
    diagonal.cov[0] = torch.tensor([0.0, 4.0])  # std sqrt(var + 1e-5), as the authors' diagonal
    assert torch.allclose(diagonal.factors([0])[0], torch.tensor([1e-5, 4 + 1e-5]).sqrt())


def test_a_finished_client_is_replaced_by_an_idle_one_never_itself():
    rotation = Rotation(gas_config(num_clients=5, active_clients=3))
    picked = set()
    for i in range(300):
        before = list(rotation.active)
        cid = before[i % 3]
        nxt = rotation.replace(cid)
        assert nxt != cid and nxt not in before
        assert rotation.active == [nxt if c == cid else c for c in before]
        picked.add(nxt)
    assert picked == set(range(5))
    assert Rotation(gas_config(num_clients=3)).replace(1) == 1  # all active: it starts again


def test_the_schedule_never_restarts_the_client_that_finished():
    config = gas_config(num_clients=4, active_clients=2, local_iters=1, model_buffer=1)
    schedule = AsyncSchedule(config, [64] * 4, lambda cid, event, batch: 1.0)
    events = [e for _ in range(30) for e in schedule.global_iteration()]
    finished = [cid for kind, cid, _ in events if kind == "finish"]
    started = [cid for kind, cid, _ in events if kind == "start"][2:]  # the replacements, in turn
    assert len(finished) == 30 and len(started) == 29  # the last one starts in the next
    assert all(new != old for new, old in zip(started, finished, strict=False))
    assert len(schedule.active) == 2


def test_steps_go_in_the_order_their_activations_arrive():
    """Client 0: its activations arrive 5 s after its step begins, the step takes 6 s; client 1:
    2 s and 3 s. Arrivals 0 → 5, 1 → 2: client 1 (done at 3, next arrival 5); tie at 5, by id:
    client 0 (done at 6, next arrival 11); client 1 (done at 6) finishes and, every client
    being active, starts again at 6 (next arrival 8): client 1 (done at 9, next arrival 11);
    tie at 11: client 0, done at 12, finishes. By start time client 0 would go first."""
    step, arrive = {0: 6.0, 1: 3.0}, {0: 5.0, 1: 2.0}

    def seconds(cid: int, event: str, batch: int) -> float:
        return {"step": step, "arrive": arrive}.get(event, {}).get(cid, 0.0)

    schedule = AsyncSchedule(gas_config(num_clients=2, local_iters=2, model_buffer=2), [64] * 2,
                             seconds)  # fmt: skip
    events = [(kind, cid) for kind, cid, _ in schedule.global_iteration()]
    assert events == [
        ("start", 0), ("start", 1), ("step", 1), ("step", 0), ("step", 1), ("finish", 1),
        ("start", 1), ("step", 1), ("step", 0), ("finish", 0),
    ]  # fmt: skip
    assert schedule.now == 12.0


def test_arrival_is_the_forward_pass_and_the_upload():
    clock = planned_clock(gas_config())
    seconds = event_seconds(clock)
    profile, sizes = clock.profiles[3], clock.sizes
    up = 32 * (sizes.activation_bytes + sizes.label_bytes)  # one message: labels ride along
    forward = 32 * clock.costs.client_model / 3
    assert seconds(3, "arrive", 32) == pytest.approx(profile.seconds(forward, up, 0, 1))
    assert 0 < seconds(3, "arrive", 32) < seconds(3, "step", 32)


def test_the_model_buffer_is_averaged_plainly():
    """GAS_main.py adds each buffered model × 1 / user_parti_num, whatever its data size."""
    algo = meta_algorithm(gas_config())
    reports = [ClientReport(0, 10, {"client_model": {"w": torch.tensor([0.0])}}, 0.0),
               ClientReport(1, 30, {"client_model": {"w": torch.tensor([4.0])}}, 0.0)]  # fmt: skip
    assert float(algo.aggregate(reports)["client_model"]["w"]) == 2.0


def test_dirichlet_by_class_is_the_authors_split():
    """utils/dataset.py's Dirichlet: class by class over the clients, every sample given out,
    clients that already hold N / m samples get no more, at least 10 samples each, unequal
    sizes; seeded; the sizes depend only on the class sizes, so the dry-run plans them."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 500))
    parts = partition("dirichlet_by_class", labels, 20, alpha=0.1, seed=3)
    sizes = [len(p) for p in parts]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(5000))
    assert min(sizes) >= 10 and len(set(sizes)) > 5
    assert all(p.dtype == np.int64 for p in parts)
    hist = label_histogram(labels, parts, 10)
    held = np.zeros(20, dtype=np.int64)
    for k in range(10):
        assert (hist[held >= 5000 / 20, k] == 0).all()
        held += hist[:, k]
    top_two = np.sort(hist, axis=1)[:, -2:].sum(1) / hist.sum(1)
    assert top_two.mean() > 0.7  # alpha 0.1: most of a client's samples are of few classes
    again = partition("dirichlet_by_class", labels, 20, alpha=0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    other = partition("dirichlet_by_class", labels, 20, alpha=0.1, seed=4)
    assert [len(p) for p in other] != sizes
    assert client_sizes("dirichlet_by_class", 5000, 20, 2, alpha=0.1, seed=3,
                        num_classes=10) == sizes  # fmt: skip
    reordered = partition("dirichlet_by_class", labels[::-1].copy(), 20, alpha=0.1, seed=3)
    assert [len(p) for p in reordered] == sizes


def test_dirichlet_by_class_by_hand():
    """Two classes of 30, two clients, alpha tiny: class 0 goes whole to one client, which then
    holds N / m = 30 and gets nothing of class 1: each client holds one class."""
    labels = np.repeat([0, 1], 30)
    hist = label_histogram(labels, partition("dirichlet_by_class", labels, 2, alpha=1e-3), 2)
    assert sorted(hist.tolist()) == [[0, 30], [30, 0]]
    with pytest.raises(ValueError, match="10"):
        partition("dirichlet_by_class", np.zeros(15), 2, alpha=0.1)
    small = gas_config(partition="dirichlet_by_class", dataset="synthetic",
                       dataset_args={"like": "digits", "num_train": 50})  # fmt: skip
    with pytest.raises(ConfigError) as e:  # the dry-run says it as a run does
        planned_client_sizes(small)
    assert e.value.key == "num_clients"


def test_gas_on_the_authors_setup_books_what_the_dry_run_plans():
    """dirichlet_by_class, 4 of 8 clients at once, full covariance, progress weights: the run's
    client sizes, traffic and simulated time are the plan's."""
    cfg = gas_config(dataset="synthetic", dataset_args={"like": "digits"},
                     partition="dirichlet_by_class", alpha=0.5, active_clients=4,
                     activation_covariance="full", rounds=2)  # fmt: skip
    prepared = prepare(cfg)
    assert [len(i) for i in prepared.client_indices] == planned_client_sizes(cfg)
    df = run_experiment(cfg, LocalRuntime(prepared), progress=None)
    planned = planned_rounds(cfg)
    assert df.sim_time_s.tolist() == pytest.approx([r["sim_time_s"] for r in planned])
    assert df.comm_gib.tolist() == pytest.approx(
        np.cumsum([(r["up_bytes"] + r["down_bytes"]) / 2**30 for r in planned]).tolist()
    )


def test_the_gas_paper_config_is_the_authors_setup():
    cfg = load_config(ROOT / "configs" / "paper" / "cifar10_gas.yaml")
    assert (cfg.model, cfg.dataset, cfg.num_clients, cfg.active_clients) == (
        "alexnet_gas", "cifar10", 20, 10)  # fmt: skip
    assert (cfg.partition, cfg.alpha, cfg.batch_size, cfg.local_iters, cfg.rounds) == (
        "dirichlet_by_class", 0.1, 32, 20, 2000)  # fmt: skip
    assert (cfg.model_buffer, cfg.activation_buffer) == (10, 10)
    assert (cfg.activation_covariance, cfg.activation_weighting) == ("full", "progress")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip) == (
        "sgd", 0.01, 0.9, 0.0005, 10.0)  # fmt: skip
    assert cfg.network_profile == "wireless"


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
