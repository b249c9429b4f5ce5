"""`amp: bf16` and `channels_last` (issue 19.2): the compute changes, what travels does not.
On the CPU, autocast runs bf16 kernels too, so both are checked here for real."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import demo_config
from test_ray_runtime import assert_same_metrics, run_local, run_ray

from fslsage.algorithms import build_algorithm
from fslsage.data import describe_dataset
from fslsage.dryrun import planned_ledger
from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.ledger import Ledger


def run_recording(cfg) -> tuple[pd.DataFrame, Ledger, set, set]:
    """A local run; its ledger, the dtypes the client model's output had, and those of the
    smashed data the S-Server received."""
    runtime = LocalRuntime(prepare(cfg))
    computed, received = set(), set()
    for client in runtime.clients:
        client.parts["client_model"].register_forward_hook(
            lambda module, args, out: computed.add(out.dtype)
        )
    on_upload = runtime.server.on_upload
    runtime.server.on_upload = lambda cid, z, y: (received.add(z.dtype), on_upload(cid, z, y))
    ledger = Ledger()
    rows = []
    try:
        for t in range(1, cfg.rounds + 1):
            outcome = runtime.run_round(t)
            ledger.merge(outcome.ledger)
            rows.append((t, outcome.train_loss, *runtime.evaluate()))
    finally:
        runtime.close()
    return pd.DataFrame(rows, columns=["round", "train_loss", "test_loss", "test_acc"]), ledger, \
        computed, received  # fmt: skip


def test_bf16_autocast_computes_in_bf16_and_sends_float32_as_planned():
    cfg = demo_config(algorithm="fsl_sage", rounds=3, align_epochs=2, amp="bf16")
    df, ledger, computed, received = run_recording(cfg)
    assert computed == {torch.bfloat16}  # the client's forward pass ran under autocast
    assert received == {torch.float32}  # what went up is float32, as planned
    planned = planned_ledger(cfg)
    for t in (1, 2, 3):
        assert ledger.round_summary(t) == planned.round_summary(t)
    plain, _, plain_computed, _ = run_recording(cfg.replace(amp="off"))
    assert plain_computed == {torch.float32}
    assert df["train_loss"].tolist() != plain["train_loss"].tolist()  # other kernels ran
    assert df["test_acc"].iloc[-1] > 0.3 and df["test_acc"].iloc[-1] == pytest.approx(
        plain["test_acc"].iloc[-1], abs=0.1
    )  # and it still learns like float32


def test_bf16_on_ray_reproduces_the_local_runtime(ray_session, tmp_path):
    """Autocast is per thread and per process: every actor (client threads, the S-Server's
    requests and evaluation steps) must turn it on, or the runtimes would differ."""
    cfg = demo_config(algorithm="splitfed_v2", rounds=2, amp="bf16", server_batching="exact")
    local = run_local(cfg, tmp_path / "local")
    ray_df, _ = run_ray(cfg, tmp_path / "ray")
    assert_same_metrics(local, ray_df)
    plain = run_local(cfg.replace(amp="off"), tmp_path / "plain")
    assert local["test_loss"].tolist() != plain["test_loss"].tolist()
    # learns as float32 does: stale bf16 weights (autocast's cache across steps) would not
    assert local["test_acc"].iloc[-1] == pytest.approx(plain["test_acc"].iloc[-1], abs=0.05)


def test_channels_last_lays_out_every_copy_of_the_convolutions_and_learns_the_same():
    cfg = demo_config(algorithm="fsl_sage", rounds=2, align_epochs=2, channels_last=True)
    algo = build_algorithm(cfg, describe_dataset(cfg.dataset))
    client = algo.new_client(0, 10, torch.device("cpu"))
    convs = [m.weight for part in client.parts.values() for m in part.modules()
             if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # really NHWC, not a 1x1 corner case
    nhwc = run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)
    plain = cfg.replace(channels_last=False)
    nchw = run_experiment(plain, LocalRuntime(prepare(plain)), progress=None)
    assert nhwc["comm_gib"].tolist() == nchw["comm_gib"].tolist()
    assert nhwc["test_loss"].tolist() == pytest.approx(nchw["test_loss"].tolist(), abs=1e-4)


def test_gas_keeps_its_statistics_in_float32_under_bf16():
    """The label-wise means, covariances and Cholesky factors are computed outside autocast (in
    bf16 they would lose the small eigenvalues): the S-Server's statistics after the same
    requests are the same, bit for bit, with and without autocast around it."""
    import copy

    from test_gas import gas_config

    from fslsage.precision import autocast

    cfg = gas_config(amp="bf16", activation_covariance="full")
    server = LocalRuntime(prepare(cfg)).server
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randn(8, *server.cut, generator=g), torch.arange(8) % 10)
                for _ in range(2 * cfg.activation_buffer)]  # fmt: skip
    servers = {"bf16": copy.deepcopy(server), "off": copy.deepcopy(server)}
    for name, each in servers.items():
        with autocast(cfg.replace(amp=name), "cpu"):
            for z, y in requests:
                each.on_exchange(0, z, y)
    a, b = servers["bf16"].stats, servers["off"].stats
    assert (a.weight > 0).sum() == 8 and a.cov.dtype == torch.float32
    assert torch.equal(a.mean, b.mean) and torch.equal(a.cov, b.cov)
