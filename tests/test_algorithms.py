"""The six algorithms on the embedded digits dataset: accuracy, and the behaviour that makes
each one what it is (who computes which gradient, what is averaged, what comes down)."""

from __future__ import annotations

import pytest
import torch
from helpers import demo_config, synchronous_algorithms

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import clone_state, loss_fn, weighted_average
from fslsage.algorithms.splitfed_v1 import PerClientServer
from fslsage.data import local_batch_sizes
from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.ledger import Ledger
from fslsage.transport import run_client_round


@pytest.mark.parametrize("algorithm", ALGORITHMS.names())
def test_each_algorithm_learns_digits(algorithm):
    """SPEC acceptance: >= 85% test accuracy on digits, 8 clients, alpha = 1, demo rounds."""
    cfg = demo_config(algorithm=algorithm)
    assert (cfg.num_clients, cfg.alpha, cfg.partition) == (8, 1.0, "dirichlet")
    df = run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)
    assert len(df) == cfg.rounds
    assert df.test_acc.iloc[-1] >= 0.85, df[["round", "test_acc", "comm_gib"]].to_string()
    assert df.comm_gib.is_monotonic_increasing


class SpyServer:
    """Delivers requests to the real S-Server role and counts them by method."""

    def __init__(self, server):
        self.server, self.calls, self.lasts = server, [], []

    def __call__(self, method, cid, *args, last=False):
        self.calls.append(method)
        self.lasts.append(last)
        return getattr(self.server, f"on_{method}")(cid, *args)


def run_one_client(runtime: LocalRuntime, t: int, cid: int = 0):
    spy = SpyServer(runtime.server)
    client = runtime.clients[cid]
    report = run_client_round(runtime.algo, client, runtime.shards[cid], t,
                              runtime.global_weights, spy)  # fmt: skip
    return spy, report


@pytest.mark.parametrize("algorithm", synchronous_algorithms())
def test_declared_server_requests_are_made_and_the_last_is_marked(algorithm):
    """`server_requests` is what a client really sends (two epochs, a partial last batch, an
    alignment round and a round without), and only the last request says so."""
    cfg = demo_config(algorithm=algorithm, local_epochs=2, batch_size=50,
                      server_update_interval=3, align_interval=2, first_align_round=1)  # fmt: skip
    runtime = LocalRuntime(prepare(cfg))
    for t in (1, 2):
        spy, _ = run_one_client(runtime, t)
        sizes = local_batch_sizes(len(runtime.shards[0]), 50, 2)
        assert sizes[-1] < 50 and len(sizes) > 4
        assert len(spy.calls) == runtime.algo.server_requests(t, sizes)
        assert spy.lasts == [False] * (len(spy.calls) - 1) + [True] * bool(spy.calls)
        if algorithm == "fsl_sage":  # round 1 aligns, after the first upload; round 2 not
            assert spy.calls[:2] == (["upload", "align"] if t == 1 else ["upload", "upload"])


@pytest.mark.parametrize("error", [-1, +1])
def test_a_round_that_breaks_its_declared_request_count_fails(error):
    """A wrong count would let the S-Server close the client's round too early (more requests
    than declared) or never mark it (fewer): both stop the round with a clear error."""
    cfg = demo_config(algorithm="cse_fsl")
    runtime = LocalRuntime(prepare(cfg))
    declared = runtime.algo.server_requests
    runtime.algo.server_requests = lambda t, sizes: declared(t, sizes) + error
    with pytest.raises(RuntimeError, match=r"server_requests\(\) declared"):
        run_one_client(runtime, t=1)


def test_fsl_sage_client_steps_on_the_aux_estimate_never_the_server_gradient():
    cfg = demo_config(algorithm="fsl_sage", align_interval=3)
    runtime = LocalRuntime(prepare(cfg))
    client = runtime.clients[0]
    net, aux = client.parts["client_model"], client.parts["aux_model"]
    seen = []  # (z, y-free) pairs: z and the gradient that reached it

    def capture(module, inputs, z):
        record = {"z": z.detach().clone()}
        z.register_hook(lambda g: record.__setitem__("grad", g.detach().clone()))
        seen.append(record)

    handle = net.register_forward_hook(capture)
    labels = []
    original_batches = runtime.shards[0].batches

    def recording_batches(*args, **kwargs):
        for x, y in original_batches(*args, **kwargs):
            labels.append(y)
            yield x, y

    runtime.shards[0].batches = recording_batches
    spy, _ = run_one_client(runtime, t=1)
    handle.remove()

    assert "exchange" not in spy.calls  # the true gradient was never requested
    assert spy.calls.count("upload") == len([k for k in range(len(seen)) if k % 5 == 0])
    assert len(seen) == len(labels) > 1
    for record, y in zip(seen, labels, strict=True):
        z = record["z"].requires_grad_(True)
        expected = torch.autograd.grad(loss_fn(aux(z), y), z)[0]
        torch.testing.assert_close(record["grad"], expected)
        # ... and it is not what the server would have sent back
        zs = record["z"].detach().requires_grad_(True)
        true = torch.autograd.grad(loss_fn(runtime.server.model(zs), y), zs)[0]
        assert not torch.allclose(record["grad"], true, atol=1e-6)


def test_fsl_sage_alignment_lowers_alignment_loss_and_aux_models_stay_per_client():
    cfg = demo_config(algorithm="fsl_sage", align_interval=2, align_epochs=30, first_align_round=1)
    runtime = LocalRuntime(prepare(cfg))
    runtime.run_round(1)  # aligns, on the first uploaded batch
    assert "align_loss" not in runtime.run_round(2).server_metrics
    assert all(len(s.buffer) > 0 for s in runtime.server.aux.stored())
    outcome = runtime.run_round(3)  # an alignment round
    metrics = outcome.server_metrics
    assert metrics["align_loss"] < 0.8 * metrics["align_loss_before"], metrics
    # aux models are not federated: not in the global weights, not in any report
    assert set(runtime.global_weights) == {"client_model"}
    auxes = [c.parts["aux_model"].state_dict() for c in runtime.clients]
    for cid, aux in enumerate(auxes):
        # the client holds exactly what its own S-Server copy was aligned to ...
        for key, value in runtime.server.aux[cid].model.state_dict().items():
            torch.testing.assert_close(aux[key], value)
    # ... and every client's differs from the others' (nothing averaged them)
    key = next(iter(auxes[0]))
    assert not torch.allclose(auxes[0][key], auxes[1][key])


def test_fsl_sage_eager_targets_are_stored_at_upload():
    cfg = demo_config(algorithm="fsl_sage", align_targets="eager", align_interval=2,
                      first_align_round=1)  # fmt: skip
    runtime = LocalRuntime(prepare(cfg))
    runtime.run_round(1)
    runtime.run_round(2)
    z, y, g = runtime.server.aux[0].buffer.tensors
    assert g.shape == z.shape and len(y) == len(z) <= cfg.align_buffer_size
    assert runtime.run_round(3).server_metrics["align_loss"] > 0


def test_fsl_sage_alignment_buffer_is_fifo_and_bounded():
    cfg = demo_config(algorithm="fsl_sage", align_buffer_size=40, align_interval=5)
    runtime = LocalRuntime(prepare(cfg))
    runtime.run_round(1)
    buffer = runtime.server.aux[0].buffer
    z_before = buffer.tensors[0].clone()
    assert len(buffer) == 40
    runtime.run_round(2)
    # the newest uploads pushed the oldest out: the buffer's head moved
    assert len(buffer) == 40 and not torch.equal(buffer.tensors[0], z_before)


def test_cse_fsl_no_gradient_comes_down_and_aux_is_averaged():
    cfg = demo_config(algorithm="cse_fsl")
    runtime = LocalRuntime(prepare(cfg))
    spy, report = run_one_client(runtime, t=1)
    assert set(spy.calls) == {"upload"}
    kinds = {kind for (_t, _c, kind, _d), _n in report.ledger}
    assert "gradients" not in kinds and "aux_model" in kinds
    assert set(report.weights) == {"client_model", "aux_model"}
    runtime.run_round(2)
    assert set(runtime.global_weights) == {"client_model", "aux_model"}


def test_splitfed_v1_averages_the_server_copies_at_round_end():
    cfg = demo_config(algorithm="splitfed_v1", num_clients=3)
    runtime = LocalRuntime(prepare(cfg))
    server: PerClientServer = runtime.server
    # two clients' batches of different sizes reach their own copies
    for cid, n in ((0, 10), (2, 30)):
        z = torch.randn(n, 32, 4, 4)
        server.on_exchange(cid, z, torch.randint(0, 10, (n,)))
    states = [clone_state(server.copies[i].model.state_dict()) for i in (0, 2)]
    key = next(k for k in states[0] if states[0][k].is_floating_point())
    assert not torch.equal(states[0][key], states[1][key])
    expected = weighted_average(states, [10, 30])
    server.end_round(1)
    copies = [c.model for c in server.copies.stored()]
    for model in [server.model, *copies]:  # client 1 sent nothing: its copy is reset too
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, expected[k])


def test_sl_passes_one_client_model_along_and_does_not_average():
    cfg = demo_config(algorithm="sl", num_clients=3)
    runtime = LocalRuntime(prepare(cfg))
    spy = SpyServer(runtime.server)
    runtime.send = spy
    runtime.run_round(1)
    assert set(spy.calls) == {"exchange"}
    last = runtime.clients[-1].parts["client_model"].state_dict()
    for key, value in runtime.global_weights["client_model"].items():
        torch.testing.assert_close(value, last[key])


def test_fedavg_averages_the_full_model_weighted_by_samples():
    cfg = demo_config(algorithm="fedavg", num_clients=3)
    runtime = LocalRuntime(prepare(cfg))
    reports = [run_one_client(runtime, 1, cid)[1] for cid in range(3)]
    assert all(set(r.weights) == {"client_model"} for r in reports)
    n = [r.num_samples for r in reports]
    got = runtime.algo.aggregate(reports)["client_model"]
    for key, value in got.items():
        if value.is_floating_point():
            parts = [
                r.weights["client_model"][key] * (w / sum(n))
                for r, w in zip(reports, n, strict=True)
            ]
            manual = sum(parts)
            torch.testing.assert_close(value, manual)
    ledger = Ledger(entries=[e for r in reports for e in r.ledger])
    assert {k[2] for k, _ in ledger.entries()} == {"client_model"}  # no split traffic at all


def test_same_seed_same_metrics_different_seed_different():
    def final(seed):
        cfg = demo_config(algorithm="splitfed_v2", rounds=2, seed=seed)
        return run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)

    a, b, c = final(0), final(0), final(1)
    assert a.test_loss.tolist() == b.test_loss.tolist()
    assert a.test_loss.tolist() != c.test_loss.tolist()


def test_evaluation_leaves_the_server_model_training():
    """Evaluation switches to eval mode; the server must be back in train mode for its steps
    (BatchNorm in the ResNet server would otherwise step with frozen running statistics)."""
    cfg = demo_config(algorithm="splitfed_v2", rounds=1)
    runtime = LocalRuntime(prepare(cfg))
    runtime.run_round(1)
    runtime.evaluate()
    assert all(m.training for m in runtime.server.model.modules())
