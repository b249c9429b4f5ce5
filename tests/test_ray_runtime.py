"""The Ray runtime (actors/): parity with the in-process runtime, the S-Server's batching
policies, GPU and node placement, and recovery from a dead client actor."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from crashes import CRASHING
from helpers import ROOT, demo_config

from actors.channel import ChannelBroken, ClientChannel
from actors.client_pool import ClientActor, owned_clients
from actors.common import DataBundle, loads, pack, unpack
from actors.ordering import RoundAborted
from actors.runtime import RayRuntime, RemoteSServer
from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import cut_gradient, loss_fn, server_step
from fslsage.algorithms.fsl_sage import true_cut_gradient
from fslsage.experiment import LocalRuntime, prepare, run_experiment

METRICS = ["test_acc", "test_loss", "comm_gib", "sim_time_s"]


@contextmanager
def one_thread():
    """A reference computed in this process runs with the config's one thread, like each actor
    (the runtimes set it themselves), so results are bit-equal."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_local(cfg, out: Path) -> pd.DataFrame:
    runtime = LocalRuntime(prepare(cfg))
    try:
        run_experiment(cfg, runtime, out_dir=out, progress=None)
    finally:
        runtime.close()
    return pd.read_parquet(out / "metrics.parquet")


def run_ray(cfg, out: Path, before=None) -> tuple[pd.DataFrame, dict]:
    runtime = RayRuntime(prepare(cfg))
    try:
        info = before(runtime) if before is not None else {}
        run_experiment(cfg, runtime, out_dir=out, progress=None)
    finally:
        runtime.close()
    return pd.read_parquet(out / "metrics.parquet"), info


def run_ray_through_client_crash(
    ray, cfg, out: Path, actor_index: int, t: int, choose: Callable[[list[int]], int]
) -> pd.DataFrame:
    """Runs `cfg` on Ray with client actor `actor_index` armed to die as it is about to run
    client `choose(its owned clients)` in round t (tests/crashes.py); checks that Ray restarted
    it in a new process and returns the run's metrics."""
    runtime = RayRuntime(prepare(cfg), actor_classes=CRASHING)
    actor = runtime.client_actors[actor_index]
    try:
        pid = ray.get(actor.where.remote())["pid"]
        ray.get(actor.arm_crash.remote(t, choose(runtime.owned[actor_index])))
        run_experiment(cfg, runtime, out_dir=out, progress=None)
        assert ray.get(actor.where.remote())["pid"] != pid  # it died and Ray restarted it
    finally:
        runtime.close()
    return pd.read_parquet(out / "metrics.parquet")


def assert_same_metrics(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert a["round"].tolist() == b["round"].tolist()
    for col in METRICS:
        assert (a[col] - b[col]).abs().max() <= 1e-6, (col, a[col].tolist(), b[col].tolist())


def assert_local_evaluations(cfg, evaluations: list[tuple[float, float]]) -> None:
    """Each round's (test loss, accuracy) equals the in-process runtime's, to 1e-6."""
    local = LocalRuntime(prepare(cfg))
    expected = [(local.run_round(t), local.evaluate())[1] for t in range(1, cfg.rounds + 1)]
    local.close()
    flat = [x for pair in evaluations for x in pair]
    assert flat == pytest.approx([x for pair in expected for x in pair], abs=1e-6)


# ----------------------------------------------------------------------------- runtime parity
def parity_config(algorithm: str, **overrides):
    """A tiny run of `algorithm` on digits: 2 rounds of 4 clients (gas: a short schedule)."""
    tiny = {"gas": {"local_iters": 4, "model_buffer": 3, "activation_buffer": 2}}
    return demo_config(**{"algorithm": algorithm, "rounds": 2, "num_clients": 4,
                          **tiny.get(algorithm, {}), **overrides})  # fmt: skip


@pytest.mark.parametrize("algorithm", ALGORITHMS.names())
def test_exact_batching_reproduces_the_local_runtime(ray_session, tmp_path, algorithm):
    cfg = parity_config(algorithm, server_batching="exact")
    local = run_local(cfg, tmp_path / "local")
    ray_df, _ = run_ray(cfg, tmp_path / "ray")
    assert_same_metrics(local, ray_df)


def test_coalesce_serves_the_relay_of_sl_as_exact_does(ray_session, tmp_path):
    """sl's clients take turns (`round_stages`): no two of its requests ever wait together, so
    `coalesce` serves them one at a time, in the in-process order."""
    cfg = parity_config("sl", server_batching="coalesce")
    local = run_local(cfg, tmp_path / "local")
    ray_df, _ = run_ray(cfg, tmp_path / "ray")
    assert_same_metrics(local, ray_df)


def test_killed_client_actor_restarts_from_the_checkpoint(ray_session, tmp_path):
    # the default checkpoints (every 10 rounds, 5 minutes): only the state before round 1
    cfg = demo_config(algorithm="splitfed_v2", rounds=3)
    # the first actor's second client: the actor dies mid-round 2
    ray_df = run_ray_through_client_crash(ray_session, cfg, tmp_path / "ray", 0, 2, lambda o: o[1])
    assert ray_df["round"].tolist() == [1, 2, 3]
    # restored from round 0's checkpoint and round 1 re-run: nothing lost, nothing doubled
    assert_same_metrics(run_local(cfg, tmp_path / "local"), ray_df)


def test_warm_start_on_ray_survives_a_crash_in_the_round_after_it(ray_session, tmp_path):
    """Round 0 (the warm start) is checkpointed; a client actor dies in round 1, the run is
    restored from round 0's checkpoint and round 1 opens again with the warm aux model handed
    to the S-Server (round 2 aligns from it): the in-process runtime's metrics, each round
    once."""
    cfg = demo_config(algorithm="fsl_sage", warm_start=True, rounds=2, align_interval=2,
                      checkpoint_every=1)  # fmt: skip
    ray_df = run_ray_through_client_crash(ray_session, cfg, tmp_path / "ray", 1, 1, lambda o: o[0])
    assert ray_df["round"].tolist() == [0, 1, 2]
    assert_same_metrics(run_local(cfg, tmp_path / "local"), ray_df)


def test_s_server_dying_as_it_opens_a_round_is_restored_from_the_checkpoint(ray_session, tmp_path):
    """Round 3 is submitted before round 2's evaluation is read, and the S-Server evaluates round
    2 as it opens round 3: it dies there, and the run still reports every round once, with the
    in-process runtime's metrics. With the default checkpoints (every 10 rounds), from the state
    before round 1, rounds 1 and 2 re-run."""
    cfg = demo_config(algorithm="fsl_sage", rounds=3)
    ray = ray_session
    runtime = RayRuntime(prepare(cfg), actor_classes=CRASHING)
    try:
        pid = ray.get(runtime.server.where.remote())["pid"]
        ray.get(runtime.server.arm_crash.remote(3))
        run_experiment(cfg, runtime, out_dir=tmp_path / "ray", progress=None)
        after = ray.get(runtime.server.where.remote())["pid"]
    finally:
        runtime.close()
    assert after != pid  # Ray restarted the S-Server in a new process
    ray_df = pd.read_parquet(tmp_path / "ray" / "metrics.parquet")
    assert ray_df["round"].tolist() == [1, 2, 3]
    assert_same_metrics(run_local(cfg, tmp_path / "local"), ray_df)


def test_s_server_restarted_between_rounds_is_noticed_and_restored(ray_session):
    """An S-Server that dies with no call in flight comes back from Ray with its initial state
    and nothing fails; the next round's opening notices (StateLost), and the F-Server restores
    the checkpoint instead of training on against a blank server."""
    cfg = demo_config(algorithm="fsl_sage", rounds=3, checkpoint_every=1)
    ray = ray_session
    runtime = RayRuntime(prepare(cfg))
    evaluations = []
    try:
        pid = ray.get(runtime.server.where.remote())["pid"]
        for t in range(1, cfg.rounds + 1):
            runtime.run_round(t, checkpoint=True)
            evaluations.append(runtime.evaluate())
            if t == 1:  # between rounds: nothing in flight
                ray.kill(runtime.server, no_restart=False)
                wait_for_restart(ray, runtime.server, pid)
    finally:
        runtime.close()
    assert_local_evaluations(cfg, evaluations)


def wait_for_restart(ray, actor, old_pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.where.remote(), timeout=10)["pid"] != old_pid:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError("the actor did not restart")


def test_100_virtual_clients_run_on_4_actors(ray_session, tmp_path):
    owned = owned_clients(100, 4)
    assert all(c % 4 == a for a, cids in enumerate(owned) for c in cids)
    assert sorted(c for cids in owned for c in cids) == list(range(100))
    cfg = demo_config(num_clients=100, num_client_actors=4, client_cpus=0.5, rounds=1)
    ray_df, owned = run_ray(cfg, tmp_path / "ray", before=lambda runtime: runtime.owned)
    assert [len(cids) for cids in owned] == [25] * 4
    assert_same_metrics(run_local(cfg, tmp_path / "local"), ray_df)


def test_client_shards_are_views_of_the_dataset_in_the_object_store(ray_session):
    """The dataset is put in the object store once; in a worker, each shard is a slice of that
    shared memory (no copy), holding exactly the samples `Prepared.shard` gathers, in order."""
    ray = ray_session
    prepared = prepare(demo_config())

    @ray.remote(num_cpus=0)
    def shards(bundle: DataBundle):
        views = [bundle.shard(cid, torch.device("cpu")) for cid in range(len(bundle.offsets) - 1)]
        shared = [np.shares_memory(v.x.numpy(), bundle.train_x.memory) and
                  np.shares_memory(v.y.numpy(), bundle.train_y.memory) for v in views]  # fmt: skip
        stored = not bundle.train_x.memory.flags.writeable  # deserialised from the store
        return shared, stored, [(v.x.clone(), v.y.clone()) for v in views]

    shared, stored, data = ray.get(shards.remote(ray.put(DataBundle.of(prepared))))
    assert stored and all(shared) and len(shared) == 8
    for cid, (x, y) in enumerate(data):
        reference = prepared.shard(cid, torch.device("cpu"))
        assert torch.equal(x, reference.x) and torch.equal(y, reference.y)
        assert x.stride() == reference.x.stride()


# ----------------------------------------------------------------------------- the S-Server
def start_server(algorithm: str, batching: str, **overrides):
    cfg = demo_config(algorithm=algorithm, server_batching=batching, **overrides)
    prepared = prepare(cfg)
    server = RemoteSServer.options(num_cpus=0).remote(
        prepared.algorithm, DataBundle.of(prepared), batching, cfg.max_batch, cfg.max_wait_ms
    )
    return prepared, server


def smashed(prepared, cid: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A real (z, y) request: client `cid`'s first batch through the initial client model."""
    shard = prepared.shard(cid, torch.device("cpu"))
    x, y = next(shard.batches(batch_size, 1, torch.Generator().manual_seed(cid)))
    with torch.no_grad():
        return prepared.algorithm.split.client(x), y


def test_exact_serves_clients_in_id_order(ray_session):
    ray = ray_session
    prepared, server = start_server("splitfed_v2", "exact")
    requests = {cid: [smashed(prepared, cid, 16), smashed(prepared, cid + 2, 8)] for cid in (0, 1)}
    try:
        ray.get(server.begin_round.remote(1, 1, [0, 1]))
        # client 1 asks first, but exact mode serves client 0's whole round before it
        late = server.submit.remote(1, 1, 0, "exchange", *requests[1][0])
        early = [server.submit.remote(1, 0, k, "exchange", *requests[0][k]) for k in (1, 0)]
        ray.get(early)
        assert ray.wait([late], timeout=0.5)[0] == []  # client 0 has not said it is done
        server.submit.remote(1, 0, 2, "done")
        rest = [ray.get(late), ray.get(server.submit.remote(1, 1, 1, "exchange", *requests[1][1]))]
        server.submit.remote(1, 1, 2, "done")
        ray.get(server.end_round.remote(1, 1))
        answers = unpack([*ray.get(early)[::-1], *rest], "cpu")
        stats = ray.get(server.stats.remote())
    finally:
        ray.kill(server)
    reference = prepared.algorithm.new_server(torch.device("cpu"))
    with one_thread():
        expected = [reference.on_exchange(cid, *req) for cid in (0, 1) for req in requests[cid]]
    for (grad, loss), (ref_grad, ref_loss) in zip(answers, expected, strict=True):
        assert torch.equal(grad, ref_grad) and torch.equal(loss, ref_loss)
    assert stats["batch_sizes"] == {1: 4}


class RecordingServerHandle:
    """Stands in for the S-Server's actor handle: `submit.remote(...)` records the call."""

    def __init__(self):
        self.calls: list[tuple[int, int, str, list]] = []  # (cid, seq, kind, done markers)
        self.submit = self

    def remote(self, epoch, cid, seq, kind, *args, done=()):
        self.calls.append((cid, seq, kind, list(done)))


@pytest.mark.parametrize("declared", [True, False])
def test_a_client_actor_sends_its_done_marker_with_the_last_request(declared):
    """With the request count known, each client's "done" rides with its own last upload, so
    the S-Server can serve the next client while this one finishes; without it, the marker
    rides with the actor's next call and the last client's goes alone."""
    prepared = prepare(demo_config(algorithm="cse_fsl", num_clients=4))
    algo = prepared.algorithm
    if not declared:
        algo.server_requests = lambda t, sizes: None
    handle = RecordingServerHandle()
    actor = ClientActor(algo, DataBundle.of(prepared), [0, 2], handle, channel=False)
    actor.run_round(1, 7, algo.initial_global(), [0, 2])
    uploads = {cid: [c for c in handle.calls if c[:1] == (cid,) and c[2] == "upload"]
               for cid in (0, 2)}  # fmt: skip
    n = len(uploads[0])
    assert n >= 2 and [c[1] for c in uploads[0]] == list(range(n))
    markers = [(c[0], c[1], c[3]) for c in handle.calls if c[3] or c[2] == "done"]
    if declared:
        assert markers == [(0, n - 1, [(0, n)]), (2, len(uploads[2]) - 1, [(2, len(uploads[2]))])]
    else:
        assert markers == [(2, 0, [(0, n)]), (2, len(uploads[2]), [])]
        assert handle.calls[-1][2] == "done"


def test_the_same_node_channel_answers_like_the_server_and_breaks_with_it(ray_session):
    """A request through the S-Server's Unix socket is served like a Ray call: an upload steps
    the server, an alignment's answer equals the in-process server's, an error is raised in the
    client; once the S-Server is gone the channel says so (ChannelBroken). (A client actor then
    falls back to Ray calls: the S-Server restart tests go through that.)"""
    ray = ray_session
    prepared, server = start_server("fsl_sage", "exact")
    z, y = smashed(prepared, 0, 16)
    pid = ray.get(server.where.remote())["pid"]
    try:
        node, path, key = ray.get(server.channel.remote())
        assert node == ray.get_runtime_context().get_node_id()
        channel = ClientChannel(path, key)
        ray.get(server.begin_round.remote(2, 1, [0]))
        assert channel.request((1, 0, 0, "upload", pack((z, y)), []), answered=False) is None
        aligned = unpack(channel.request((1, 0, 1, "align", (), []), answered=True), "cpu")
        with pytest.raises(RoundAborted, match="round attempt 0"):
            channel.request((0, 0, 0, "align", (), []), answered=True)
    finally:
        ray.kill(server, no_restart=True)
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(ChannelBroken):
        channel.request((1, 0, 2, "align", (), []), answered=True)
    channel.close()
    reference = prepared.algorithm.new_server(torch.device("cpu"))
    with one_thread():
        reference.on_upload(0, z, y)
        expected = reference.on_align(0)
    assert aligned.keys() == expected.keys()
    assert all(torch.equal(aligned[k], expected[k]) for k in expected)


def test_requests_may_overtake_the_opening_of_their_round(ray_session):
    """The F-Server does not wait for begin_round: requests of a round attempt that has not
    begun wait for it, "done" markers may ride along with a later request, and begin_round
    evaluates the previous round's global weights with the server as that round left it, while
    the server already serves its own round (the evaluation fills the gaps between requests)."""
    ray = ray_session
    # one test sample per evaluation step: hundreds of steps, the round's request goes first
    prepared, server = start_server("splitfed_v2", "exact", eval_batch_size=1)
    requests = [smashed(prepared, cid, 8) for cid in (0, 1)]
    weights = prepared.algorithm.initial_global()
    try:
        ray.get(server.begin_round.remote(1, 1, [0, 1]))
        # client 1's request waits for client 0 in exact order: pending when attempt 1 ends
        stale = server.submit.remote(1, 1, 0, "exchange", *pack(requests[1]))
        # attempt 2's requests and its end arrive before attempt 2 is opened
        answers = [server.submit.remote(2, 0, 0, "exchange", *pack(requests[0]))]
        end = server.end_round.remote(1, 2)
        answers.append(server.submit.remote(2, 1, 0, "exchange", *pack(requests[1]), done=[(0, 1)]))
        assert ray.wait([*answers, end], timeout=0.5)[0] == []  # all wait for the opening
        server.begin_round.remote(1, 2, [0, 1])
        with pytest.raises(ray.exceptions.RayTaskError, match="RoundAborted"):
            ray.get(stale)  # attempt 1 was abandoned when attempt 2 began
        answers = unpack(ray.get(answers), "cpu")
        assert ray.wait([end], timeout=0.5)[0] == []  # client 1 is not done yet
        server.submit.remote(2, 1, 1, "done")
        metrics = ray.get(end)
        as_left = ray.get(server.evaluate.remote(weights))  # the server as round 2 left it
        # round 3's request arrives first; the opening snapshots the server before serving it
        next_round = server.submit.remote(3, 0, 0, "exchange", *pack(requests[0]))
        opening = server.begin_round.remote(2, 3, [0, 1], after=2, previous_global=weights)
        first, _ = ray.wait([opening, next_round], num_returns=1)
        assert first == [next_round]  # served while the evaluation was still under way
        evaluation = ray.get(opening)
        after_step = ray.get(server.evaluate.remote(weights))
        stats = ray.get(server.stats.remote())
    finally:
        ray.kill(server)
    reference = prepared.algorithm.new_server(torch.device("cpu"))
    with one_thread():
        expected = [reference.on_exchange(cid, *req) for cid, req in enumerate(requests)]
    for (grad, loss), (ref_grad, ref_loss) in zip(answers, expected, strict=True):
        assert torch.equal(grad, ref_grad) and torch.equal(loss, ref_loss)
    assert metrics == {}  # splitfed_v2 logs no server metrics of its own
    assert evaluation == as_left and evaluation != after_step
    assert 0.0 <= evaluation[1] <= 1.0
    assert stats["batch_sizes"] == {1: 3}  # the abandoned attempt's request never ran


def test_the_next_round_evaluates_the_last_one_as_it_opens(ray_session):
    """As the F-Server loop drives it: run_round(t) leaves no round running, start_round(t + 1)
    submits the next, whose opening evaluates round t's global model (after a checkpoint round
    too), and `evaluate` answers with that; the evaluations are the in-process runtime's. The
    S-Server is on the client actors' node: their requests went through the same-node channel.
    A round checkpoints where its caller says (the loop's `Cadence`), as in-process: not by
    `checkpoint_every` on its own."""
    ray = ray_session
    cfg = demo_config(algorithm="fsl_sage", rounds=4, checkpoint_every=1)
    runtime = RayRuntime(prepare(cfg))
    running, evaluations, openings, checkpointed = [], [], [], []
    try:
        for t in range(1, cfg.rounds + 1):
            runtime.run_round(t, checkpoint=True) if t == 2 else runtime.run_round(t)
            checkpointed.append(runtime.checkpoint.t)
            running.append(runtime.started)
            if t < cfg.rounds:
                runtime.start_round(t + 1)
                openings.append(runtime.started.opening)
            evaluations.append(runtime.evaluate())
        opened = ray.get(openings)
        channels = [ray.get(a.where.remote())["channel"] for a in runtime.client_actors]
    finally:
        runtime.close()
    assert running == [None] * cfg.rounds
    assert checkpointed == [0, 2, 2, 2]  # round 0: the state the run started from
    assert [tuple(e) for e in opened] == evaluations[:-1]
    assert channels and all(channels)  # the S-Server is on their node: the channel carried it all
    assert_local_evaluations(cfg, evaluations)


# (algorithm, the request kind its S-Server serves in batches): every `on_<kind>_batch` there is
# (tests/test_capabilities.py checks the list against the servers)
COALESCING = [("cse_fsl", "upload"), ("fsl_sage", "upload"), ("sl", "exchange"),
              ("splitfed_v2", "exchange")]  # fmt: skip


@pytest.mark.parametrize(("algorithm", "kind"), COALESCING)
def test_coalesce_batches_concurrent_clients_and_splits_gradients(ray_session, algorithm, kind):
    ray = ray_session
    n = 8
    prepared, server = start_server(algorithm, "coalesce", max_batch=n, max_wait_ms=2000.0,
                                    align_targets="eager")  # fmt: skip
    requests = [smashed(prepared, cid, 4 + 2 * cid) for cid in range(n)]  # unequal sizes
    try:
        ray.get(server.begin_round.remote(1, 1, list(range(n))))
        calls = []
        for c, r in enumerate(requests):  # in id order, as the reference concatenates them
            calls.append(server.submit.remote(1, c, 0, kind, *pack(r)))
            time.sleep(0.02)
        answers = unpack(ray.get(calls), "cpu")
        for cid in range(n):
            server.submit.remote(1, cid, 1, "done")
        metrics = ray.get(server.end_round.remote(1, 1))
        stats = ray.get(server.stats.remote())
        fresh = {"server": prepared.algorithm.new_server(torch.device("cpu")), "rng": {}}
        stepped = loads(ray.get(server.state.remote()), fresh, torch.device("cpu"))["server"]
    finally:
        ray.kill(server)
    assert stats["batch_sizes"] == {n: 1}  # all of them well within max_wait: one batch
    before = prepared.algorithm.new_server(torch.device("cpu"))
    with one_thread():
        if kind == "exchange":
            # each client gets ∂(its own mean loss)/∂z at the weights before the shared step
            for (grad, loss), (z, y) in zip(answers, requests, strict=True):
                torch.testing.assert_close(grad, cut_gradient(before.model, z, y), atol=1e-7,
                                           rtol=1e-4)  # fmt: skip
                torch.testing.assert_close(loss, loss_fn(before.model(z), y).detach())
        else:  # nothing comes back; FSL-SAGE buffers each upload, its target from before the step
            assert answers == [None] * n
        if algorithm == "fsl_sage":
            for cid, (z, y) in enumerate(requests):
                kept_z, kept_y, target = stepped.aux[cid].buffer.tensors
                assert torch.equal(kept_z, z) and torch.equal(kept_y, y)
                torch.testing.assert_close(target, true_cut_gradient(before.model, z, y,
                                                                     prepared.cfg))  # fmt: skip
        # and the server took ONE optimizer step, on the concatenation
        reference = copy.deepcopy(before)
        z, y = torch.cat([r[0] for r in requests]), torch.cat([r[1] for r in requests])
        loss, _ = server_step(reference.model, reference.opt, z, y)
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(stepped.model.state_dict()[key], value)
    if kind == "upload":  # the step's loss, once
        assert metrics["server_loss"] == pytest.approx(loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------- placement
def run_script(code: str, timeout: float = 150.0) -> dict:
    """A Ray instance of its own (logical GPUs, several nodes) in a child process; returns the
    JSON object the script prints last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


GPU_SCRIPT = """
import json, ray
from helpers import demo_config
from fslsage.experiment import prepare
from actors.runtime import RayRuntime
ray.init(address="local", num_cpus=3, num_gpus=3, include_dashboard=False, log_to_driver=False)
cfg = demo_config(client_gpus=0.25, client_cpus=0.25, server_gpus=1.0)
runtime = RayRuntime(prepare(cfg))
placement = runtime.placement()
print(json.dumps({"placement": placement, "available": ray.available_resources()}))
runtime.close()
ray.shutdown()
"""


def test_logical_gpus_place_fractional_clients_and_a_whole_gpu_server():
    # 8 clients x 0.25 GPU + the S-Server's whole GPU need 3 GPUs (2 would leave the server
    # unplaced); the default actor count is what the CPUs (2 left by the S-Server's one: it
    # works on a GPU) and GPUs hold: 8.
    out = run_script(GPU_SCRIPT)
    clients = out["placement"]["clients"]
    assert len(clients) == 8
    assert all(c["resources"] == {"CPU": 0.25, "GPU": 0.25} for c in clients)
    assert out["placement"]["server"]["resources"] == {"CPU": 1.0, "GPU": 1.0}
    assert out["available"].get("GPU", 0.0) == pytest.approx(0.0, abs=1e-6)


CLUSTER_SCRIPT = """
import json, ray
from ray.cluster_utils import Cluster
from helpers import demo_config
from fslsage.experiment import prepare, run_experiment
from actors.runtime import RayRuntime
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
gpu_node = cluster.add_node(num_cpus=0, resources={"accelerator_type:T4": 1})
ray.init(address=cluster.address, log_to_driver=False)
cfg = demo_config(server_accelerator="T4", num_clients=4, rounds=1)
runtime = RayRuntime(prepare(cfg))
placement = runtime.placement()
df = run_experiment(cfg, runtime, progress=None)
channels = [ray.get(a.where.remote())["channel"] for a in runtime.client_actors]
runtime.close()
print(json.dumps({"placement": placement, "server_node": gpu_node.node_id,
                  "head_node": cluster.head_node.node_id, "rounds": len(df),
                  "channels": channels}))
ray.shutdown()
cluster.shutdown()
"""


def test_two_node_cluster_puts_the_s_server_on_the_accelerator_node():
    out = run_script(CLUSTER_SCRIPT)
    assert out["placement"]["server"]["node_id"] == out["server_node"]
    assert {c["node_id"] for c in out["placement"]["clients"]} == {out["head_node"]}
    assert out["rounds"] == 1
    assert out["channels"] == [False, False]  # another node: their requests went as Ray calls
