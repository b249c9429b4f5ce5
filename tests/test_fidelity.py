"""FSL-SAGE as the authors' code runs it (github srijith1996/FSL-SAGE): it aligns in its first
round, after the first upload and the server's step on it; the alignment targets come from the
server in train mode unless `align_target_mode: eval`; auxiliary models have their own
optimizer (Adam 1e-3, no weight decay), for CSE-FSL's client-side steps too."""

from __future__ import annotations

import pytest
import torch
from helpers import demo_config
from torch import nn

from fslsage.algorithms.fsl_sage import AligningServer
from fslsage.dryrun import planned_ledger
from fslsage.experiment import LocalRuntime, prepare
from fslsage.ledger import Ledger


def test_the_first_round_aligns_and_its_clients_use_the_aligned_aux_model():
    cfg = demo_config(algorithm="fsl_sage", align_interval=10, rounds=1, first_align_round=1)
    runtime = LocalRuntime(prepare(cfg))
    initial = {k: v.clone() for k, v in runtime.clients[0].parts["aux_model"].state_dict().items()}
    outcome = runtime.run_round(1)
    assert outcome.server_metrics["align_loss"] >= 0
    for client, aligned in zip(runtime.clients, runtime.server.aux.stored(), strict=True):
        used = client.parts["aux_model"].state_dict()
        assert all(torch.equal(used[k], v) for k, v in aligned.model.state_dict().items())
    assert any(not torch.equal(used[k], initial[k]) for k in initial)  # not the random head
    # a real run books the aux download the dry-run plans: once per client, in round 1
    measured = Ledger()
    measured.merge(outcome.ledger)
    planned = planned_ledger(cfg)
    assert planned.round_summary(1)["by_kind"]["aux_model"]["down"] > 0
    assert measured.round_summary(1) == planned.round_summary(1)


def test_first_align_round_moves_every_alignment_and_the_dry_run_follows():
    """`first_align_round: 2` with l = 2 aligns in rounds 2 and 4 (the schedule before the
    reference's was adopted), clients keep the initial aux head in round 1, and the run books
    the aux downloads the dry-run plans, round by round."""
    cfg = demo_config(algorithm="fsl_sage", align_interval=2, first_align_round=2, rounds=4,
                      align_epochs=1)  # fmt: skip
    runtime = LocalRuntime(prepare(cfg))
    initial = {k: v.clone() for k, v in runtime.clients[0].parts["aux_model"].state_dict().items()}
    planned = planned_ledger(cfg)
    aligned_rounds = []
    for t in range(1, 5):
        outcome = runtime.run_round(t)
        measured = Ledger()
        measured.merge(outcome.ledger)
        assert measured.round_summary(t) == planned.round_summary(t)
        if "align_loss" in outcome.server_metrics:
            aligned_rounds.append(t)
        if t == 1:
            used = runtime.clients[0].parts["aux_model"].state_dict()
            assert all(torch.equal(used[k], v) for k, v in initial.items())
    assert aligned_rounds == [2, 4]
    assert [t for t in range(1, 5) if "aux_model" in planned.round_summary(t)["by_kind"]] == [2, 4]


def bn_server() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_alignment_targets_in_train_mode_move_the_servers_bn_statistics(mode):
    cfg = demo_config(algorithm="fsl_sage", align_epochs=1, align_target_mode=mode)
    server = AligningServer(bn_server(), cfg, 1, aux_init=nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    server.on_upload(0, z, y)
    bn = server.model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    server.on_align(0)
    after = (bn.running_mean, bn.running_var, int(bn.num_batches_tracked))
    moved = not torch.equal(before[0], after[0]) and before[2] + 1 == after[2]
    assert moved == (mode == "train")
    if mode == "eval":
        assert torch.equal(before[1], after[1]) and before[2] == after[2]
    assert server.model.training  # the server goes on training either way


def test_aux_models_have_their_own_optimizer():
    cfg = demo_config(algorithm="cse_fsl", lr=0.05, weight_decay=0.01)
    client = LocalRuntime(prepare(cfg)).clients[0]
    (aux,) = client.optimizers["aux_model"].param_groups
    (net,) = client.optimizers["client_model"].param_groups
    assert (aux["lr"], aux["weight_decay"]) == (1e-3, 0.0)  # the reference's aux optimizer
    assert (net["lr"], net["weight_decay"]) == (0.05, 0.01)
    assert isinstance(client.optimizers["aux_model"], torch.optim.Adam)
    sage = demo_config(algorithm="fsl_sage", aux_lr=0.02, aux_weight_decay=0.001,
                       aux_optimizer="sgd")  # fmt: skip
    server = LocalRuntime(prepare(sage)).server
    (group,) = server.aux[0].opt.param_groups
    assert isinstance(server.aux[0].opt, torch.optim.SGD)
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.001)
