"""`server_mode: stateless` (SPEC §2): replicas answer from the published weights and store
their gradients; a reducer averages them every `sync_every` requests and steps."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from crashes import CRASHING
from helpers import demo_config
from test_ray_runtime import assert_local_evaluations, assert_same_metrics, run_local, run_ray
from torch import nn

from actors.common import loads
from actors.runtime import RayRuntime
from fslsage.algorithms.base import cut_gradient, loss_fn, make_optimizer
from fslsage.config import ConfigError
from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.stateless import StatelessServer, load_record, replica_answer, save_record

METRICS = ["test_acc", "test_loss", "train_loss", "comm_gib"]


def bn_server() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def requests(n: int, batch: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n)]  # fmt: skip


def test_a_replica_answers_without_keeping_state():
    model = bn_server()
    before = copy.deepcopy(model.state_dict())
    ((z, y),) = requests(1)
    grad, loss, record = replica_answer(model, z, y)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # parameters and buffers as they were
    reference = copy.deepcopy(model)
    zr = z.clone().requires_grad_(True)
    ref_loss = loss_fn(reference(zr), y)
    ref_loss.backward()
    torch.testing.assert_close(grad, zr.grad)
    torch.testing.assert_close(loss, ref_loss.detach())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(record.grads[name], p.grad)
    for name, b in reference.named_buffers():  # the forward pass moved the running statistics
        assert torch.equal(record.buffers[name], b)
    assert not torch.equal(record.buffers["1.running_mean"], before["1.running_mean"])


def test_the_reducer_steps_on_the_mean_every_sync_every_requests(tmp_path):
    cfg = demo_config(algorithm="splitfed_v2", server_mode="stateless", sync_every=3,
                      gradient_store="files", gradient_store_path=str(tmp_path))  # fmt: skip
    server = StatelessServer(bn_server(), cfg, num_clients=2)
    initial = copy.deepcopy(server.model)
    reqs = requests(4)
    answers = [server.on_exchange(cid % 2, z, y) for cid, (z, y) in enumerate(reqs[:3])]
    assert server.version == 1 and server.applied == 3
    assert list(tmp_path.iterdir()) == []  # applied records leave the store
    for (grad, _), (z, y) in zip(answers, reqs[:3], strict=True):  # all saw the initial weights
        torch.testing.assert_close(grad, cut_gradient(copy.deepcopy(initial), z, y))
    # by hand: the mean gradient and the mean moved buffers, one Adam step
    expected = copy.deepcopy(initial)
    opt = make_optimizer(expected, cfg)
    records = [replica_answer(copy.deepcopy(initial), z, y)[2] for z, y in reqs[:3]]
    for name, p in expected.named_parameters():
        p.grad = sum(r.grads[name] for r in records) / 3
    with torch.no_grad():
        for name, b in expected.named_buffers():
            b.copy_((sum(r.buffers[name].double() for r in records) / 3).to(b.dtype))
    opt.step()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(server.model.state_dict()[key], value)
        torch.testing.assert_close(server.replica.state_dict()[key], value)  # published
    # the fourth waits in the store until the round ends
    z, y = reqs[3]
    server.on_exchange(0, z, y)
    assert server.version == 1 and len(list(tmp_path.iterdir())) == 1
    server.end_round(1)
    assert server.version == 2 and server.applied == 4 and list(tmp_path.iterdir()) == []


def test_a_record_file_round_trips(tmp_path):
    ((z, y),) = requests(1)
    _, _, record = replica_answer(bn_server(), z, y)
    path = save_record(tmp_path / "store", record)
    back = load_record(path)
    assert Path(path).parent == tmp_path / "store" and Path(path).suffix == ".pt"
    for a, b in ((record.grads, back.grads), (record.buffers, back.buffers)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algorithm", ["splitfed_v2", "sl"])
def test_sync_every_one_is_the_stateful_server(algorithm):
    cfg = demo_config(algorithm=algorithm, rounds=2)
    stateful = run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)
    stateless_cfg = cfg.replace(server_mode="stateless", sync_every=1)
    stateless = run_experiment(stateless_cfg, LocalRuntime(prepare(stateless_cfg)), progress=None)
    for col in METRICS:
        assert stateless[col].tolist() == pytest.approx(stateful[col].tolist(), abs=1e-6), col


def test_once_a_round_applies_every_gradient_at_the_round_end():
    cfg = demo_config(algorithm="splitfed_v2", server_mode="stateless", sync_every=0, rounds=2)
    runtime = LocalRuntime(prepare(cfg))
    df = run_experiment(cfg, runtime, progress=None)
    batches = sum(-(-len(s) // cfg.batch_size) for s in runtime.shards)
    assert runtime.server.version == 2  # one step per round
    assert runtime.server.applied == 2 * batches  # every request's gradient, once
    assert df["test_acc"].iloc[-1] > df["test_acc"].iloc[0]  # and it learns


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"algorithm": "fsl_sage", "server_mode": "stateless"}, "server_mode"),
        ({"algorithm": "splitfed_v1", "server_mode": "stateless"}, "server_mode"),
        ({"server_mode": "stateles"}, "server_mode"),
        ({"sync_every": -1}, "sync_every"),
        ({"server_replicas": 0}, "server_replicas"),
        ({"gradient_store": "s3"}, "gradient_store"),
    ],
)
def test_bad_stateless_config_names_the_key(changes, key):
    with pytest.raises(ConfigError) as e:
        demo_config(**changes)
    assert e.value.key == key


# ----------------------------------------------------------------------------- on Ray
@pytest.mark.parametrize("store", ["object_store", "files"])
def test_ray_replicas_reproduce_the_in_process_run(ray_session, tmp_path, store):
    """Two replica actors answer the clients, the S-Server actor reduces once a round: the
    in-process runtime's metrics to 1e-6, and record files leave the store once applied."""

    path = str(tmp_path / "store") if store == "files" else ""
    cfg = demo_config(algorithm="splitfed_v2", server_mode="stateless", sync_every=0, rounds=2,
                      gradient_store=store, gradient_store_path=path)  # fmt: skip

    def served(runtime) -> dict:
        return {"replicas": runtime.replicas}

    ray_df, info = run_ray(cfg, tmp_path / "ray", before=served)
    assert len(info["replicas"]) == cfg.server_replicas
    assert_same_metrics(run_local(cfg, tmp_path / "local"), ray_df)
    if store == "files":
        assert list((tmp_path / "store").iterdir()) == []


def test_replicas_killed_and_added_mid_run_lose_no_update(ray_session):
    """Replica 0 dies after filing a record and before answering it (its client asks replica 1,
    which files the same request again); then replica 1 is killed for good and a new one added.
    Every gradient is applied once: the run equals the in-process one."""
    ray = ray_session
    cfg = demo_config(algorithm="splitfed_v2", server_mode="stateless", sync_every=0, rounds=3)
    runtime = RayRuntime(prepare(cfg), actor_classes=CRASHING)  # replicas of tests/crashes.py
    try:
        first, second = runtime.replicas
        pid = ray.get(first.where.remote())["pid"]
        ray.get(first.arm_crash.remote())
        rows = []
        for t in range(1, cfg.rounds + 1):
            runtime.run_round(t)
            rows.append(runtime.evaluate())
            if t == 1:
                ray.kill(second, no_restart=True)
                added = runtime.add_replica()
        served = ray.get(added.where.remote())["served"]
        restarted = ray.get(first.where.remote())["pid"] != pid  # it died, and Ray restarted it
        fresh = {"server": prepare(cfg).algorithm.new_server(torch.device("cpu")), "rng": {}}
        state = loads(ray.get(runtime.server.state.remote()), fresh, torch.device("cpu"))
        applied = state["server"].applied
    finally:
        runtime.close()
    assert_local_evaluations(cfg, rows)
    batches = sum(-(-len(part) // cfg.batch_size) for part in prepare(cfg).client_indices)
    assert applied == cfg.rounds * batches  # none lost, none twice
    assert served > 0  # the added replica took requests
    assert restarted
