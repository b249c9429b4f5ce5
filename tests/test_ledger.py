"""The communication ledger against hand-computed bytes (SPEC §3) and against real runs."""

from __future__ import annotations

import pytest
import torch
from helpers import demo_config, paper_config, synchronous_algorithms

from fslsage.algorithms import ALGORITHMS
from fslsage.data import describe_dataset
from fslsage.dryrun import planned_ledger
from fslsage.experiment import LocalRuntime, prepare
from fslsage.ledger import Ledger
from fslsage.models import build_model

CUT_BYTES = 128 * 4 * 4 * 4  # resnet18 cut on 32x32 inputs: 128x4x4 float32 per sample
LABEL_BYTES = 8  # int64 label per sample


def full_state_bytes(module: torch.nn.Module) -> int:
    """Every parameter and buffer, counted from a real (not meta) state_dict."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.fixture(scope="module")
def resnet_bytes() -> dict[str, int]:
    split = build_model("resnet18", describe_dataset("cifar10"))
    return {
        "client": full_state_bytes(split.client),
        "server": full_state_bytes(split.server),
        "aux": full_state_bytes(split.aux),
    }


def test_cut_layer_is_8192_bytes_per_sample(resnet_bytes):
    assert CUT_BYTES == 8192
    # the resnet18 client/server state sizes the paper's accounting is made of
    assert resnet_bytes["client"] + resnet_bytes["server"] == 44_765_128


def hand_computed(algorithm: str, t: int, bytes_: dict[str, int], l: int = 10) -> dict:
    """Per-client bytes of one round on CIFAR-10 with 10 clients, batch 256, q=5: each client
    holds 5000 samples = 19 batches of 256 + one of 136 (20 local iterations)."""
    batches = [256] * 19 + [136]
    uploaded = [b for k, b in enumerate(batches) if k % 5 == 0]  # k = 0, 5, 10, 15
    client, aux = bytes_["client"], bytes_["aux"]
    out: dict[tuple[str, str], int] = {}
    if algorithm == "fedavg":
        full = client + bytes_["server"]
        out = {("client_model", "down"): full, ("client_model", "up"): full}
    elif algorithm in ("sl", "splitfed_v1", "splitfed_v2"):
        out = {
            ("activations", "up"): 5000 * CUT_BYTES,
            ("labels", "up"): 5000 * LABEL_BYTES,
            ("gradients", "down"): 5000 * CUT_BYTES,
            ("client_model", "down"): client,
            ("client_model", "up"): client,
        }
    elif algorithm == "cse_fsl":
        out = {
            ("activations", "up"): sum(uploaded) * CUT_BYTES,
            ("labels", "up"): sum(uploaded) * LABEL_BYTES,
            ("client_model", "down"): client,
            ("client_model", "up"): client,
            ("aux_model", "down"): aux,
            ("aux_model", "up"): aux,
        }
    elif algorithm == "fsl_sage":
        out = {
            ("activations", "up"): sum(uploaded) * CUT_BYTES,
            ("labels", "up"): sum(uploaded) * LABEL_BYTES,
            ("client_model", "down"): client,
            ("client_model", "up"): client,
        }
        if (t - 1) % l == 0:  # the first round and every l-th after (the reference's t % l, t ≥ 0)
            out[("aux_model", "down")] = aux
    return out


@pytest.mark.parametrize("algorithm", synchronous_algorithms())  # gas: tests/test_gas.py
def test_paper_ledger_matches_hand_computed_bytes(algorithm, resnet_bytes):
    cfg = paper_config(algorithm=algorithm, rounds=11)
    ledger = planned_ledger(cfg)
    for t in (1, 9, 10, 11):
        for cid in (0, 9):
            assert ledger.client_round_bytes(t, cid) == hand_computed(algorithm, t, resnet_bytes), (
                f"{algorithm} round {t} client {cid}"
            )


def test_fsl_sage_aux_download_only_on_alignment_rounds(resnet_bytes):
    ledger = planned_ledger(paper_config(algorithm="fsl_sage", rounds=30))
    aux_rounds = [t for t in ledger.rounds() if "aux_model" in ledger.round_summary(t)["by_kind"]]
    assert aux_rounds == [1, 11, 21]
    assert ledger.round_summary(21)["by_kind"]["aux_model"] == {
        "up": 0,
        "down": 10 * resnet_bytes["aux"],
    }


def measured_ledger(cfg) -> Ledger:
    runtime = LocalRuntime(prepare(cfg))
    ledger = Ledger()
    for t in range(1, cfg.rounds + 1):
        ledger.merge(runtime.run_round(t).ledger)
    return ledger


@pytest.mark.parametrize("algorithm", ALGORITHMS.names())
def test_dry_run_equals_what_a_real_run_sends(algorithm):
    """The analytic ledger (--dry-run) and the bytes the transport actually booked agree."""
    cfg = demo_config(algorithm=algorithm, rounds=2, align_interval=2, align_epochs=1)
    planned, measured = planned_ledger(cfg), measured_ledger(cfg)
    assert measured.rounds() == [1, 2]
    for t in (1, 2):
        assert measured.round_summary(t) == planned.round_summary(t)
    assert measured.total_bytes() > 0
