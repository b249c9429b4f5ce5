"""Memory at scale (issue 19.3): the S-Server's per-client state on the compute device only while
its client is served (`offload_client_state`), and the per-round `peak_gpu_mib*` columns.

On the CPU the offloading path is forced (`offload_client_state: always`): every move is a copy,
so the results must be bit-identical to keeping everything in place, and the copies tell which
client's tensors are the ones moved in. The figures for the CIFAR-10 paper config come from its
real model built on the meta device (nothing allocated)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import demo_config, paper_config

import fslsage.experiment as experiment
from actors.common import DataBundle, dumps, loads
from fslsage.algorithms.base import aux_optimizer, cut_gradient, make_optimizer, server_step
from fslsage.algorithms.fsl_sage import AuxState, FifoBuffer
from fslsage.algorithms.splitfed_v1 import ServerCopy
from fslsage.data import describe_dataset
from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.memory import (
    MIB,
    ClientStates,
    offloads_client_state,
    peak_gpu_columns,
    peak_gpu_mib,
    split_peak_columns,
    state_bytes,
    state_tensors,
)
from fslsage.models import build_model, cut_shape

GIB = 1 << 30
OFFLOADED = ("fsl_sage", "splitfed_v1")


def offload_config(algorithm: str, offload: str, **changes):
    """A short run that serves every client each round and aligns in every fsl_sage round."""
    base = {"num_clients": 4, "rounds": 3, "align_interval": 1, "align_epochs": 3}
    return demo_config(algorithm=algorithm, offload_client_state=offload, **{**base, **changes})


def client_states(runtime: LocalRuntime) -> ClientStates:
    server = runtime.server
    return server.aux if hasattr(server, "aux") else server.copies


def snapshot(states: ClientStates) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in state_tensors(s)] for s in states.stored()]


# ----------------------------------------------------------------------------- offloading
def test_offload_is_on_where_the_s_server_computes_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    auto = demo_config()
    assert auto.offload_client_state == "auto"
    assert offloads_client_state(auto, cuda) and not offloads_client_state(auto, cpu)
    assert offloads_client_state(demo_config(offload_client_state="always"), cpu)
    assert not offloads_client_state(demo_config(offload_client_state="never"), cuda)


@pytest.mark.parametrize("algorithm", OFFLOADED)
def test_offloaded_client_state_gives_bit_identical_results(algorithm):
    """Forced on, on the CPU, every client's state is copied in and out as it is served; the
    metrics and every client's final state (models, optimizer moments, buffers) are exactly
    those of a run that keeps everything in place."""
    results = {}
    for offload in ("never", "always"):
        cfg = offload_config(algorithm, offload)
        runtime = LocalRuntime(prepare(cfg))
        df = run_experiment(cfg, runtime, progress=None)
        states = client_states(runtime)
        results[offload] = (df.drop(columns="wall_s"), snapshot(states), states.moves)
    (df_off, kept_off, moves_off), (df_on, kept_on, moves_on) = results["never"], results["always"]
    pd.testing.assert_frame_equal(df_on, df_off, check_exact=True)
    assert moves_off == 0 and moves_on >= 2 * 4 * 3 - 1  # in and out, every client, every round
    for off, on in zip(kept_off, kept_on, strict=True):
        assert len(on) == len(off) and all(torch.equal(a, b) for a, b in zip(on, off, strict=True))


@pytest.mark.parametrize("algorithm", OFFLOADED)
def test_at_most_one_clients_state_is_on_the_compute_device(algorithm, monkeypatch):
    """Tracks the copies the holder keeps on the host (the states as built, and every state it
    moves out): at every request, at most one client holds tensors that are not such a copy —
    the one served — and what it holds there is its whole state, one client's bytes."""
    # the kept host copies by address (held, so that no other tensor takes one; a moved
    # parameter keeps its identity, its memory is what changes)
    host: dict[int, torch.Tensor] = {}

    def keep(states: ClientStates, cid: int) -> None:
        host.update({t.data_ptr(): t.detach() for t in state_tensors(states.states[cid])})

    def on_device(states: ClientStates) -> dict[int, int]:
        """Bytes each client holds outside its host copy (moved in, or made while served)."""
        out = {}
        for cid, state in enumerate(states.stored()):
            moved = [t for t in state_tensors(state) if t.data_ptr() not in host]
            if moved:
                out[cid] = sum(t.numel() * t.element_size() for t in moved)
        return out

    seen: list[dict[int, int]] = []
    get, move_out = ClientStates.__getitem__, ClientStates._move_out

    def checked_get(self, cid):
        seen.append(on_device(self))  # as the previous request left it
        return get(self, cid)

    def tracked_move_out(self, cid):
        move_out(self, cid)
        keep(self, cid)

    monkeypatch.setattr(ClientStates, "__getitem__", checked_get)
    monkeypatch.setattr(ClientStates, "_move_out", tracked_move_out)
    cfg = offload_config(algorithm, "always")
    runtime = LocalRuntime(prepare(cfg))
    states = client_states(runtime)
    for cid in range(len(states)):
        keep(states, cid)
    for t in (1, 2):
        runtime.run_round(t)
    last = on_device(states)
    assert len(seen) > 4 * 2 and all(len(resident) <= 1 for resident in seen)
    assert {cid for resident in seen for cid in resident} == set(range(4))  # all took turns
    assert list(last) == [states.resident]
    one_client = state_bytes(states.states[states.resident])
    everyone = sum(state_bytes(s) for s in states.stored())
    assert last[states.resident] == one_client and everyone > 3.5 * one_client


def test_an_offloaded_server_round_trips_through_a_checkpoint():
    """The S-Server's checkpoint holds the kept states and the resident one as they are; the
    restored server goes on exactly like the original."""
    cfg = offload_config("fsl_sage", "always")
    runtime = LocalRuntime(prepare(cfg))
    runtime.run_round(1)
    original = runtime.server
    assert original.aux.resident is not None  # one client's state is on the device
    restored = loads(dumps(original), LocalRuntime(prepare(cfg)).server, "cpu")
    z, y = original.aux[0].buffer.tensors[:2]
    for server in (original, restored):
        server.on_upload(1, z[:8], y[:8])
    aligned = [server.on_align(1) for server in (original, restored)]
    assert all(torch.equal(aligned[0][k], aligned[1][k]) for k in aligned[0])


# ----------------------------------------------------------------------------- the paper's figures
def paper_split(num_clients: int = 100):
    cfg = paper_config(num_clients=num_clients)
    info = describe_dataset(cfg.dataset)
    with torch.device("meta"):
        split = build_model(cfg.model, info, **cfg.model_args)
    return cfg, split, cut_shape(split, info)


def test_the_cifar10_paper_config_keeps_one_clients_state_on_the_card():
    """Bytes of one client's state in the CIFAR-10 ResNet-18 paper config (its real model on the
    meta device, after an alignment or server step, so gradients and Adam's moments exist; the
    alignment buffer full) and of 100 clients': offloading, the card holds one client's (the
    holder's tests above), not 100.

    fsl_sage: aux 2 102 282 parameters → ×4 (weights, gradients, Adam's two moments) + BN
    buffers = 33.65 MB, buffer 1000 × (128·4·4 float32 + int64 label) = 8.20 MB: 41.85 MB a
    client, 4.19 GB for 100. splitfed_v1: a server copy of 10 498 570 parameters ×4 + buffers =
    168.0 MB a client, 16.8 GB (15.6 GiB) for 100 — most of a 24 GiB card before any activation."""
    cfg, split, cut = paper_split()
    n = cfg.align_buffer_size
    z = torch.zeros(n, *cut, device="meta")
    y = torch.zeros(n, dtype=torch.long, device="meta")

    aux = split.aux
    opt = aux_optimizer(aux, cfg)
    cut_gradient(aux, z[:8], y[:8], "sum", create_graph=True).pow(2).sum().backward()
    opt.step()
    buffer = FifoBuffer(n)
    buffer.tensors = (z, y)
    aux_client = state_bytes(AuxState(aux, opt, buffer))
    params = sum(p.numel() for p in aux.parameters())
    bn = sum(b.numel() * b.element_size() for b in aux.buffers())
    assert params == 2_102_282
    assert aux_client == 4 * 4 * params + bn + n * (4 * 128 * 4 * 4 + 8)
    assert aux_client == pytest.approx(41.85e6, rel=1e-3)

    server = split.server
    server_opt = make_optimizer(server, cfg)
    server_step(server, server_opt, z[:8], y[:8])
    copy_client = state_bytes(ServerCopy(server, server_opt))
    assert sum(p.numel() for p in server.parameters()) == 10_498_570
    assert copy_client == pytest.approx(168.0e6, rel=1e-3)

    clients = cfg.num_clients
    assert clients == 100
    # offloading: one client's state on the card; keeping all: a hundred
    assert clients * aux_client / GIB == pytest.approx(3.90, abs=0.01)
    assert clients * copy_client / GIB == pytest.approx(15.65, abs=0.01)
    assert copy_client / GIB < 0.16  # offloaded: what splitfed_v1's copies take on the card


# ----------------------------------------------------------------------------- peak memory
@pytest.fixture
def fake_cuda_peaks(monkeypatch):
    """torch.cuda's peak memory: each reading returns the next of 100, 300, 200 … MiB (bytes);
    resets are recorded with their device."""
    readings = iter([100, 300, 200, 400, 500, 600, 700, 800])
    calls = {"read": [], "reset": []}

    def max_memory_allocated(device=None):
        calls["read"].append(device)
        return next(readings) * MIB

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: calls["reset"].append(device))  # fmt: skip
    return calls


def test_peak_gpu_mib_reads_the_cuda_peak_and_starts_the_next(fake_cuda_peaks):
    cuda = torch.device("cuda", 0)
    assert peak_gpu_mib(cuda) == 100.0 and peak_gpu_mib(cuda) == 300.0
    assert fake_cuda_peaks == {"read": [cuda, cuda], "reset": [cuda, cuda]}
    assert peak_gpu_mib(torch.device("cpu")) is None  # off CUDA: nothing read, nothing reset
    assert len(fake_cuda_peaks["read"]) == 2


def test_peak_gpu_columns_name_each_process_kind():
    assert peak_gpu_columns(local=12.5) == {"peak_gpu_mib": 12.5}
    columns = peak_gpu_columns(server=3.0, replicas=[1.0, None, 2.0], clients=[4.0, 6.0])
    assert columns == {"peak_gpu_mib_server": 3.0, "peak_gpu_mib_replicas": 2.0,
                       "peak_gpu_mib_clients": 6.0}  # fmt: skip
    assert peak_gpu_columns(local=None, server=None, replicas=[None], clients=[None]) == {}
    metrics, peaks = split_peak_columns({"align_loss": 0.5, **columns})
    assert metrics == {"align_loss": 0.5} and peaks == columns


def test_the_in_process_runtime_reports_its_peak_every_round(
    fake_cuda_peaks, monkeypatch, tmp_path
):
    """On CUDA (its readings faked) each round's row carries the peak read at that round's end,
    read once and reset once a round; the column reaches the parquet file."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(experiment, "peak_gpu_mib", lambda device: peak_gpu_mib(cuda))
    cfg = demo_config(rounds=3, num_clients=2)
    runtime = LocalRuntime(prepare(cfg))
    df = run_experiment(cfg, runtime, out_dir=tmp_path, progress=None)
    assert list(df["peak_gpu_mib"]) == [100.0, 300.0, 200.0]
    assert fake_cuda_peaks["reset"] == [cuda] * 3
    stored = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(stored["peak_gpu_mib"]) == [100.0, 300.0, 200.0]


def test_on_the_cpu_the_metrics_have_no_peak_columns(tmp_path):
    cfg = demo_config(rounds=1, num_clients=2)
    df = run_experiment(cfg, LocalRuntime(prepare(cfg)), out_dir=tmp_path, progress=None)
    assert not [c for c in df.columns if c.startswith("peak_gpu_mib")]
    assert list(pd.read_parquet(tmp_path / "metrics.parquet").columns) == list(df.columns)


@pytest.fixture
def compute_settings():
    """A client actor built in this process sets torch's compute settings: put back after."""
    before = experiment.ComputeSettings.current()
    yield
    before.apply()


def test_a_client_actor_returns_its_peak_with_the_rounds_reports(
    fake_cuda_peaks, monkeypatch, compute_settings
):
    """A client actor (built in this process) reads its peak at the end of each call and hands
    it back in the summary with the reports; off CUDA it hands back None."""
    from test_ray_runtime import RecordingServerHandle

    import actors.client_pool as client_pool

    prepared = prepare(demo_config(algorithm="cse_fsl", num_clients=4))
    algo = prepared.algorithm
    actor = client_pool.ClientActor(algo, DataBundle.of(prepared), [0, 2],
                                    RecordingServerHandle(), channel=False)  # fmt: skip
    summary, *weights = actor.run_round(1, 1, algo.initial_global(), [0, 2])
    assert summary["peak_gpu_mib"] is None and len(weights) == 2
    assert [r.cid for r in summary["reports"]] == [0, 2]
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(client_pool, "peak_gpu_mib", lambda device: peak_gpu_mib(cuda))
    summary, *_ = actor.run_round(2, 2, algo.initial_global(), [0, 2])
    assert summary["peak_gpu_mib"] == 100.0 and fake_cuda_peaks["reset"] == [cuda]
    assert peak_gpu_columns(clients=[summary["peak_gpu_mib"], None]) == {
        "peak_gpu_mib_clients": 100.0}  # fmt: skip


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", OFFLOADED)
def test_on_a_gpu_one_clients_state_is_on_the_card_and_results_agree(algorithm):
    """Offloading on CUDA (auto) keeps one client's state on the card — the memory allocated
    after a round is the kept-in-place run's less all clients' states but one — and, with
    deterministic kernels, the metrics are those of the run that keeps them all on the card."""
    allocated, rows = {}, {}
    for offload in ("never", "auto"):
        cfg = offload_config(algorithm, offload, device="cuda", deterministic=True, num_clients=8)
        runtime = LocalRuntime(prepare(cfg))
        rows[offload] = run_experiment(cfg, runtime, progress=None).drop(columns="wall_s")
        torch.cuda.synchronize()
        states = client_states(runtime)
        assert states.offload == (offload == "auto")
        kept = [state_bytes(s) for cid, s in enumerate(states.stored()) if cid != states.resident]
        allocated[offload] = torch.cuda.memory_allocated()
        runtime.close()
        del runtime, states
    assert rows["never"].drop(columns="peak_gpu_mib").equals(
        rows["auto"].drop(columns="peak_gpu_mib"))  # fmt: skip
    assert len(kept) == 7  # every client's state but the resident one's is off the card
    saved = allocated["never"] - allocated["auto"]  # the allocator rounds blocks up to 512 B
    assert sum(kept) <= saved <= 1.1 * sum(kept) + 64 * 1024
