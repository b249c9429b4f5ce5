"""Training options of the paper setups (issue 19.4, 20.9): AdamW, SGD momentum, gradient-norm
clipping, a per-round lr schedule, label smoothing in the training losses, and perplexity for a
language model. Each is checked against torch's own definition, and in a real run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import demo_config
from test_data import write_e2e_csv
from torch import nn

from fslsage.algorithms.base import (
    IGNORE_INDEX,
    aux_optimizer,
    coalesced_step,
    loss_fn,
    make_optimizer,
    round_lr_factor,
    server_step,
)
from fslsage.algorithms.fsl_sage import true_cut_gradient
from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.stateless import replica_answer


def linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def test_adamw_decays_weights_apart_from_the_gradient():
    cfg = demo_config(optimizer="adamw", lr=0.1, weight_decay=0.5)
    model = linear()
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    before = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)  # no gradient: only the decay acts
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()
    assert torch.allclose(model.weight, before * (1 - 0.1 * 0.5))
    # adam adds the decay to the gradient instead: a zero gradient still moves by ~lr
    adam_model = linear()
    adam = make_optimizer(adam_model, cfg.replace(optimizer="adam"))
    adam_model.weight.grad = torch.zeros_like(adam_model.weight)
    adam_model.bias.grad = torch.zeros_like(adam_model.bias)
    adam.step()
    assert not torch.allclose(adam_model.weight, before * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sgd_takes_the_configured_momentum(momentum):
    opt = make_optimizer(linear(), demo_config(optimizer="sgd", momentum=momentum))
    assert opt.param_groups[0]["momentum"] == momentum


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_grad_clip_bounds_every_models_step(clip):
    cfg = demo_config(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=clip,
                      aux_optimizer="sgd", aux_lr=1.0)  # fmt: skip
    for build in (make_optimizer, aux_optimizer):
        model = linear()
        opt = build(model, cfg)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.full_like(p, 10.0)  # norm 10 · √15 ≈ 38.7
        opt.step()
        steps = zip(model.parameters(), before, strict=True)
        moved = torch.cat([(p - b).flatten() for p, b in steps]).norm()
        expected = 1.0 if clip else 10.0 * math.sqrt(15)
        assert moved.item() == pytest.approx(expected, rel=1e-5)


def test_round_lr_factor_warms_up_then_decays_linearly():
    cfg = demo_config(rounds=5, lr_schedule="warmup_linear", warmup_rounds=2)
    assert [round_lr_factor(cfg, t) for t in range(1, 6)] == [0.5, 1.0, 1.0, 2 / 3, 1 / 3]
    no_warmup = cfg.replace(warmup_rounds=0)
    assert [round_lr_factor(no_warmup, t) for t in range(1, 6)] == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert round_lr_factor(no_warmup, 0) == 1.0  # a warm start trains at round 1's rate
    assert all(round_lr_factor(cfg.replace(lr_schedule="constant"), t) == 1 for t in range(6))


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v1"])
def test_the_schedule_reaches_client_and_server_models_but_not_aux_models(algorithm):
    cfg = demo_config(algorithm=algorithm, rounds=3, lr=0.01, lr_schedule="warmup_linear",
                      warmup_rounds=0, num_clients=2, align_epochs=1)  # fmt: skip
    runtime = LocalRuntime(prepare(cfg))
    server_opts = runtime.server.scheduled_optimizers()
    assert len(server_opts) == (3 if algorithm == "splitfed_v1" else 1)  # + the copies
    for t in (1, 2, 3):
        runtime.run_round(t)
        want = 0.01 * (3 - t + 1) / 3
        for client in runtime.clients:
            assert client.optimizers["client_model"].param_groups[0]["lr"] == pytest.approx(want)
            if "aux_model" in client.optimizers:
                assert client.optimizers["aux_model"].param_groups[0]["lr"] == cfg.aux_lr
        for opt in server_opts:
            assert opt.param_groups[0]["lr"] == pytest.approx(want)
    if algorithm == "fsl_sage":
        aux_opts = [state.opt for state in runtime.server.aux.stored()]
        assert all(o.param_groups[0]["lr"] == cfg.aux_lr for o in aux_opts)


def test_label_smoothing_is_torchs_and_keeps_ignored_targets_out():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, :2] = IGNORE_INDEX
    want = F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1), ignore_index=IGNORE_INDEX,
                           label_smoothing=0.1)  # fmt: skip
    assert loss_fn(logits, y, label_smoothing=0.1) == pytest.approx(want.item())
    assert loss_fn(logits, y, label_smoothing=0.1) != pytest.approx(loss_fn(logits, y).item())


def test_every_server_path_trains_on_the_smoothed_loss():
    """The exact step, the coalesced step, a stateless replica and FSL-SAGE's alignment targets
    all differentiate the same smoothed loss."""
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    leaf = z.clone().requires_grad_(True)
    want_loss = F.cross_entropy(linear()(leaf), y, label_smoothing=0.2)
    (want_grad,) = torch.autograd.grad(want_loss, leaf)
    model = linear()
    loss, grad = server_step(model, torch.optim.SGD(model.parameters(), lr=0.0), z, y, 0.2)
    assert loss.item() == pytest.approx(want_loss.item()) and torch.allclose(grad, want_grad)
    model = linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    _, grads, losses = coalesced_step(model, opt, [z[:2], z[2:]], [y[:2], y[2:]], 0.2)
    assert torch.allclose(torch.cat([grads[0] * 2 / 6, grads[1] * 4 / 6]), want_grad, atol=1e-7)
    grad, loss, _ = replica_answer(linear(), z, y, 0.2)
    assert loss.item() == pytest.approx(want_loss.item()) and torch.allclose(grad, want_grad)
    cfg = demo_config(label_smoothing=0.2)
    per_sample = true_cut_gradient(linear(), z, y, cfg)  # reduction "sum": the mean's × n
    assert torch.allclose(per_sample / len(y), want_grad, atol=1e-7)


def test_a_language_run_logs_perplexity_and_a_classifier_does_not(tmp_path):
    write_e2e_csv(tmp_path)
    cfg = demo_config(
        dataset="e2e", dataset_args={"seq_len": 48}, data_dir=str(tmp_path), download=False,
        model="gpt2", model_args={"n_layer": 2, "n_embd": 16, "n_head": 2, "client_layers": 1,
                                  "aux_layers": 1},
        partition="iid", num_clients=2, rounds=2, batch_size=2, eval_batch_size=2,
        optimizer="adamw", lr_schedule="warmup_linear", label_smoothing=0.1, align_epochs=1,
    )  # fmt: skip
    df = run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)
    assert list(df["test_perplexity"]) == pytest.approx([math.exp(v) for v in df["test_loss"]])
    digits = run_experiment(demo_config(rounds=1), LocalRuntime(prepare(demo_config(rounds=1))),
                            progress=None)  # fmt: skip
    assert "test_perplexity" not in digits.columns
