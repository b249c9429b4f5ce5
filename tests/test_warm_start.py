"""Warm start (SPEC §2): round 0 is one round of cse_fsl before the first round, for every
algorithm with an auxiliary model — in both runtimes, in the ledger and in the dry-run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import demo_config

from fslsage.algorithms.base import clone_state
from fslsage.config import ConfigError
from fslsage.dryrun import planned_rounds
from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.ledger import Ledger, state_bytes


@pytest.mark.parametrize(
    "changes, culprit",
    [
        ({"algorithm": "fedavg"}, "fedavg"),
        ({"algorithm": "fsl_sage", "search": {"algorithm": ["cse_fsl", "splitfed_v2"]}},
         "splitfed_v2"),
    ],
)  # fmt: skip
def test_warm_start_needs_an_auxiliary_model(changes, culprit):
    with pytest.raises(ConfigError) as e:
        demo_config(warm_start=True, **changes)
    assert e.value.key == "warm_start"
    assert f"(cse_fsl, fsl_sage); {culprit} cannot" in str(e.value)


def test_round_zero_is_a_cse_fsl_round_and_hands_its_aux_model_on():
    """fsl_sage with a warm start: round 0 trains client and aux models on the local loss and
    averages both; round 1 sends the averaged aux model down to every client, and the
    S-Server's copies start from it too: round 1 aligns them from there."""
    cfg = demo_config(warm_start=True, rounds=1, align_interval=5, first_align_round=1)
    runtime = LocalRuntime(prepare(cfg))
    aligned_from = []  # the aux state each alignment starts from
    align = runtime.server.align

    def spy(aux, *args):
        aligned_from.append(clone_state(aux.state_dict()))
        return align(aux, *args)

    runtime.server.align = spy
    initial_aux = clone_state(runtime.clients[0].parts["aux_model"].state_dict())
    assert set(runtime.global_weights) == {"client_model", "aux_model"}  # cse_fsl's parts

    round0 = runtime.run_round(0)
    warm_aux = runtime.global_weights["aux_model"]
    assert set(runtime.global_weights) == {"client_model", "aux_model"}
    assert any(not torch.equal(warm_aux[k], initial_aux[k]) for k in warm_aux)  # it trained
    aux_up = sum(1 for (_t, _c, kind, d), _n in round0.ledger if (kind, d) == ("aux_model", "up"))
    assert aux_up == cfg.num_clients  # cse_fsl's round: aux models go up to be averaged

    round1 = runtime.run_round(1)
    assert set(runtime.global_weights) == {"client_model"}  # fsl_sage averages no aux model
    assert len(aligned_from) == cfg.num_clients
    for start in aligned_from:  # every S-Server copy was aligned from the warm aux model
        for key, value in start.items():
            assert torch.equal(value, warm_aux[key])
    for client, (aux, _, _) in zip(runtime.clients, runtime.server.aux.stored(), strict=True):
        # the client uses the aligned model it got, and never trains it
        for key, value in client.parts["aux_model"].state_dict().items():
            assert torch.equal(value, aux.state_dict()[key])
    kinds = Ledger()
    kinds.merge(round1.ledger)
    by_kind = kinds.round_summary(1)["by_kind"]
    assert by_kind["aux_model"].get("up", 0) == 0
    aux_bytes = state_bytes(warm_aux)
    # per client: the warm aux model with the global weights, then the aligned one
    assert by_kind["aux_model"]["down"] == 2 * cfg.num_clients * aux_bytes


def test_a_warm_started_run_reports_round_zero_and_matches_its_dry_run(tmp_path):
    cfg = demo_config(warm_start=True, rounds=2, first_align_round=1)
    df = run_experiment(cfg, LocalRuntime(prepare(cfg)), out_dir=tmp_path, progress=None)
    assert df["round"].tolist() == [0, 1, 2]
    assert pd.read_parquet(tmp_path / "metrics.parquet")["round"].tolist() == [0, 1, 2]
    plan = planned_rounds(cfg)
    assert [r["round"] for r in plan] == [0, 1, 2]
    gib = pd.Series([r["up_bytes"] + r["down_bytes"] for r in plan]).cumsum() / 2**30
    assert df["comm_gib"].tolist() == pytest.approx(gib.tolist(), rel=1e-12)
    assert df["sim_time_s"].tolist() == pytest.approx([r["sim_time_s"] for r in plan])
    # the warm round costs what a cse_fsl round costs; round 1 adds the warm aux model going
    # down (before the aligned one, as in a cold round 1)
    cse = planned_rounds(cfg.replace(algorithm="cse_fsl", rounds=1, warm_start=False))[0]
    assert plan[0]["up_bytes"] == cse["up_bytes"] and plan[0]["down_bytes"] == cse["down_bytes"]
    cold = planned_rounds(cfg.replace(warm_start=False, rounds=1))[0]
    aux_down = cold["by_kind"]["aux_model"]["down"]
    assert aux_down > 0 and plan[1]["by_kind"]["aux_model"]["down"] == 2 * aux_down
    assert plan[1]["down_bytes"] == cold["down_bytes"] + aux_down


def test_warm_start_of_cse_fsl_is_one_more_cse_fsl_round():
    cfg = demo_config(algorithm="cse_fsl", warm_start=True, rounds=1)
    warm = LocalRuntime(prepare(cfg))
    cold = LocalRuntime(prepare(cfg.replace(warm_start=False, rounds=2)))
    for t_warm, t_cold in ((0, 1), (1, 2)):
        a, b = warm.run_round(t_warm), cold.run_round(t_cold)
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-6)
    assert warm.evaluate() == pytest.approx(cold.evaluate(), abs=1e-6)
