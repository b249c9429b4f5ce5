"""The fractional-GPU cluster path, checked on a machine without a GPU: CUDA calls replaced,
Ray's GPU assignment faked (in this process) or logical (a Ray instance of its own): the device
each actor resolves and its memory cap, checkpoints that hold generators, the client actors
that fit per card, and the bundle each actor takes in a trial's placement group."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import ray
import torch
from helpers import demo_config
from test_ray_runtime import run_script

from actors.client_pool import ClientActor
from actors.common import (
    CUDA_CONTEXT_BYTES,
    DataBundle,
    actor_device,
    dumps,
    loads,
    memory_fraction,
)
from actors.s_server import SServer
from fslsage.algorithms.base import Client, make_optimizer
from fslsage.checkpoint import KIND
from fslsage.config import ConfigError
from fslsage.experiment import prepare
from fslsage.placement import actor_demands, check_fits, client_actor_count
from tune.resources import trial_bundles

GIB = 1 << 30


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA "available" with one 80 GiB card, current device 0; Ray assigns the GPU ids in
    `assigned` (none by default). Memory caps are recorded, the device checked as torch does."""
    calls: list[tuple[float, torch.device]] = []
    state = SimpleNamespace(assigned=[], calls=calls)

    def set_fraction(fraction, device=None):
        torch.cuda._utils._get_device_index(device)  # torch's check: an indexed device
        calls.append((fraction, device))

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: list(state.assigned))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=80 * GIB))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    return state


@pytest.fixture
def threads():
    """Actors built in this process set torch's thread count: put back after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- devices
def test_a_gpu_share_caps_an_indexed_device_below_its_share(fake_cuda):
    fake_cuda.assigned = [3]  # as Ray numbers it; CUDA_VISIBLE_DEVICES makes it cuda:0 here
    device = actor_device(demo_config(device="auto"), 0.25, "client actor")
    assert device == torch.device("cuda", 0)
    [(fraction, capped)] = fake_cuda.calls
    assert capped == torch.device("cuda", 0)
    assert fraction == pytest.approx(0.25 - CUDA_CONTEXT_BYTES / (80 * GIB))
    # a whole card is not capped; a small share of a small card keeps half of it
    assert actor_device(demo_config(device="cuda"), 1.0, "S-Server") == torch.device("cuda", 0)
    assert len(fake_cuda.calls) == 1
    assert memory_fraction(0.05, 16 * GIB) == pytest.approx(0.025)


def test_auto_without_an_assigned_gpu_computes_on_the_cpu(fake_cuda, threads):
    """Ray 2.60 leaves CUDA visible to an actor given no GPU: CUDA is "available" there, and the
    client actor must still stay on the CPU (it used to take the first card, uncapped)."""
    cfg = demo_config(device="auto", num_clients=4)
    prepared = prepare(cfg)
    actor = ClientActor(prepared.algorithm, DataBundle.of(prepared), [0, 2], server=None,
                        channel=False)  # fmt: skip
    assert actor.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in actor.clients[0].parts["client_model"].parameters())
    assert fake_cuda.calls == []


def test_assigned_gpus_without_cuda_fail_clearly(monkeypatch, threads):
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = demo_config(device="auto", num_clients=4)
    prepared = prepare(cfg)
    with pytest.raises(RuntimeError, match=r"^S-Server: Ray assigned GPU ids \[1\].*CUDA does not"):
        SServer(prepared.algorithm, DataBundle.of(prepared), gpu_fraction=1.0)


def test_a_local_trial_without_gpus_computes_on_the_cpu(fake_cuda, monkeypatch):
    """In a process Ray started (a Tune trial) with no GPU assigned, the in-process runtime
    stays off the card CUDA would offer."""
    from fslsage.run import make_runtime

    monkeypatch.setattr("fslsage.run._started_by_ray", lambda: True)
    runtime = make_runtime(prepare(demo_config(device="auto", num_clients=2)))
    try:
        assert runtime.device == torch.device("cpu")
    finally:
        runtime.close()


# ----------------------------------------------------------------------------- checkpoints
def meta_client(cfg, generator: torch.Generator) -> Client:
    """A client as an actor on a device would build it (the meta device stands for a GPU)."""
    model = torch.nn.Linear(4, 2).to("meta")
    return Client(0, {"client_model": model}, {"client_model": make_optimizer(model, cfg)},
                  generator, num_samples=10)  # fmt: skip


def test_a_checkpoint_restores_generators_on_the_cpu_and_tensors_on_the_device():
    """The failure on a GPU, reproduced with the meta device: restoring with map_location=<the
    device> moved each generator's CPU state there and Generator.__setstate__ rejected it. A
    checkpoint now writes values into the objects the actor built: the generator's state stays
    on the CPU, the parameters on the device, shared with their optimizer."""
    cfg = demo_config()
    generator = torch.Generator().manual_seed(7)
    torch.rand(5, generator=generator)  # somewhere in its stream
    client = meta_client(cfg, generator)
    restored = loads(dumps(client), meta_client(cfg, torch.Generator()), torch.device("meta"))
    assert restored.generator.device == torch.device("cpu")
    assert torch.equal(
        torch.rand(8, generator=restored.generator), torch.rand(8, generator=generator)
    )
    params = list(restored.parts["client_model"].parameters())
    assert all(p.device.type == "meta" for p in params)
    assert restored.optimizers["client_model"].param_groups[0]["params"] == params  # shared


def test_a_checkpoint_is_plain_data_that_runs_no_code_when_read():
    """What an actor hands over for a checkpoint reads back with torch.load(weights_only=True):
    tensors, numbers, strings and containers, no pickled objects (issue 22.4)."""
    cfg = demo_config()
    client = prepare(cfg).algorithm.new_client(0, 10, torch.device("cpu"))
    plain = torch.load(io.BytesIO(dumps(client)), weights_only=True)
    assert plain[KIND] == "object" and plain["state"]["generator"][KIND] == "generator"


def test_a_trained_clients_host_state_stays_on_the_cpu_on_any_device():
    """What a role keeps on the CPU by design comes back there, whatever device restores it:
    its generator's state (and numbers) and Adam's step counts."""
    cfg = demo_config()
    prepared = prepare(cfg)
    client = prepared.algorithm.new_client(0, 10, torch.device("cpu"))
    model, opt = client.parts["client_model"], client.optimizers["client_model"]
    model(torch.randn(2, *prepared.info.input_shape)).sum().backward()
    opt.step()
    torch.rand(3, generator=client.generator)
    target = prepared.algorithm.new_client(0, 10, torch.device("cpu"))
    target.parts["client_model"].to("meta")
    restored = loads(dumps(client), target, torch.device("meta"))
    state = restored.optimizers["client_model"].state
    assert state and all(s["step"].device.type == "cpu" for s in state.values())
    assert torch.equal(
        torch.rand(4, generator=restored.generator), torch.rand(4, generator=client.generator)
    )


# ----------------------------------------------------------------------------- packing
def test_client_actors_are_counted_per_card_and_next_to_the_s_servers_cpu():
    tenths = demo_config(num_clients=100, client_gpus=0.3, client_cpus=0.5, server_gpus=1.0)
    # 3 free cards x 3 (not 3 GPUs / 0.3 = 10): 0.1 of each card is left over
    assert client_actor_count(tenths, {"CPU": 16.0, "GPU": 4.0}) == 9
    # the S-Server goes where it leaves the most: on the 1-card node it would leave 4 (the
    # other node's CPUs); on the 3-card node, 2 there (1 CPU left) and 3 on the 1-card node
    nodes = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 3.0}]
    assert client_actor_count(tenths, nodes) == 5
    quarters = demo_config(client_gpus=0.25, client_cpus=0.25, server_gpus=1.0)
    assert client_actor_count(quarters, {"CPU": 2.0, "GPU": 3.0}) == 4  # 1 CPU left: 4 x 0.25
    assert client_actor_count(demo_config(), {"CPU": 2.0}) == 2  # CPU-only: no CPU reserved
    # stateless replicas with a GPU share take their cards first
    stateless = demo_config(algorithm="splitfed_v2", server_mode="stateless", server_gpus=0.5,
                            client_gpus=0.5, client_cpus=1.0)  # fmt: skip
    assert client_actor_count(stateless, {"CPU": 8.0, "GPU": 2.0}) == 1
    # a trial reserves what the count says: two 0.4 shares a card on the 2 cards left
    bundles = trial_bundles(demo_config(runtime="ray", server_gpus=1.0, client_gpus=0.4,
                                        client_cpus=0.25), {"CPU": 8.0, "GPU": 3.0})  # fmt: skip
    assert bundles == [{}, {"CPU": 1.0, "GPU": 1.0}] + [{"CPU": 0.25, "GPU": 0.4}] * 4


def test_check_fits_knows_shares_come_from_one_card_and_the_s_server_takes_a_cpu():
    cfg = demo_config(num_clients=100, client_gpus=0.3, client_cpus=0.5, server_gpus=1.0)
    assert actor_demands(cfg, 1)[0][1]["CPU"] == 1.0
    assert actor_demands(demo_config(), 1)[0][1]["CPU"] == 0.0  # CPU-only: none
    nodes = [{"CPU": 16.0, "GPU": 4.0}]
    check_fits(actor_demands(cfg, 9), nodes)
    with pytest.raises(ConfigError, match=r"^client_gpus: 10 actors ask for 0.3 GPU.*3 to a card"):
        check_fits(actor_demands(cfg, 10), nodes)  # 3 + 1 GPUs in all: the cluster has 4
    with pytest.raises(ConfigError, match=r"^server_gpus: one actor asks for 1 CPU"):
        check_fits(actor_demands(cfg, 1), [{"CPU": 0.0, "GPU": 1.0}, {"CPU": 4.0}])


# ----------------------------------------------------------------------------- placement
BUNDLES_SCRIPT = """
import json, re, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from helpers import demo_config
from tune.resources import pin_client_actors, trial_bundles
ray.init(address="local", num_cpus=3, num_gpus=3, include_dashboard=False, log_to_driver=False)
cluster = {"CPU": 3.0, "GPU": 3.0}
cfg = pin_client_actors(demo_config(runtime="ray", client_gpus=0.4, client_cpus=0.25,
                                    server_gpus=1.0), cluster)
bundles = trial_bundles(cfg, cluster)
group = placement_group(bundles[1:])  # as Tune makes it: the empty head bundle dropped
ready = bool(ray.wait([group.ready()], timeout=30)[0])

def bundle_of(actor):
    ids = ray.get(actor.__ray_call__.remote(
        lambda self: list(ray._private.worker.global_worker.core_worker.resource_ids())))
    return sorted({int(m.group(1)) for m in map(re.compile(r"^(?:CPU|GPU)_group_(\\d+)_").match,
                                                 ids) if m})

@ray.remote(num_cpus=0)
def trial(cfg):
    from actors.runtime import RayRuntime
    from fslsage.experiment import prepare
    runtime = RayRuntime(prepare(cfg))
    try:
        return {"server": bundle_of(runtime.server),
                "clients": [bundle_of(a) for a in runtime.client_actors],
                "placement": runtime.placement()}
    finally:
        runtime.close()

out = {"bundles": bundles, "ready": ready}
if ready:
    strategy = PlacementGroupSchedulingStrategy(group, 0, placement_group_capture_child_tasks=True)
    out.update(ray.get(trial.options(scheduling_strategy=strategy).remote(cfg), timeout=120))
print(json.dumps(out))
ray.shutdown()
"""


def test_a_trials_actors_each_take_their_own_bundle():
    """A trial on 3 logical GPUs: the S-Server on its whole card and one CPU, 4 client actors
    of 0.4 GPU (two a card) — each actor on the bundle reserved for it, none on another's."""
    out = run_script(BUNDLES_SCRIPT)
    assert out["bundles"][1] == {"CPU": 1.0, "GPU": 1.0} and len(out["bundles"]) == 2 + 4
    assert out["ready"]
    assert out["server"] == [0]  # Tune's group has no head bundle: the S-Server's comes first
    assert out["clients"] == [[1], [2], [3], [4]]
    assert out["placement"]["server"]["resources"] == {"CPU": 1.0, "GPU": 1.0}
    assert all(c["resources"] == {"CPU": 0.25, "GPU": 0.4} for c in out["placement"]["clients"])


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_on_a_gpu_the_share_is_capped_and_a_checkpoint_round_trips(monkeypatch):
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    cfg = demo_config(device="auto")
    device = actor_device(cfg, 0.25, "test")
    try:
        assert device.type == "cuda" and device.index is not None
        total = torch.cuda.get_device_properties(device).total_memory
        capped = torch.cuda.get_per_process_memory_fraction(device)
        assert capped == pytest.approx(memory_fraction(0.25, total))
        prepared = prepare(cfg)
        client = prepared.algorithm.new_client(0, 10, device)
        model, opt = client.parts["client_model"], client.optimizers["client_model"]
        model(torch.randn(2, *prepared.info.input_shape, device=device)).sum().backward()
        opt.step()
        fresh = prepared.algorithm.new_client(0, 10, device)
        restored = loads(dumps(client), fresh, device)
        assert restored.generator.device == client.generator.device
        assert torch.equal(torch.rand(4, generator=restored.generator, device=device),
                           torch.rand(4, generator=client.generator, device=device))  # fmt: skip
        params = list(restored.parts["client_model"].parameters())
        assert all(p.device == device for p in params)
        assert restored.optimizers["client_model"].param_groups[0]["params"] == params
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_only_a_process_ray_started_takes_its_device_from_ray(ray_session):
    """A Tune trial runs in an actor: it asks Ray for its GPUs; the driver of `fslsage.run`,
    Ray running or not, resolves its device itself."""
    from fslsage.run import _started_by_ray

    @ray_session.remote(num_cpus=0)
    class Probe:
        def started_by_ray(self) -> bool:
            from fslsage.run import _started_by_ray

            return _started_by_ray()

    probe = Probe.remote()
    try:
        assert ray_session.get(probe.started_by_ray.remote())
    finally:
        ray_session.kill(probe)
    assert not _started_by_ray()
