"""The network and speed simulation of SPEC §6: client profiles, the FLOPs each algorithm
declares, and the simulated round time (`sim_time_s`) computed from the ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fslsage.config import ConfigError, validate
from fslsage.data import describe_dataset
from fslsage.dryrun import compute_costs, planned_clock, planned_ledger, planned_rounds
from fslsage.models import build_model, dummy_input, training_flops
from fslsage.simulation import (
    Profile,
    client_profiles,
    equal_profiles,
    shannon_rate_bps,
    wireless_profiles,
)

DIGITS = {"dataset": "digits", "model": "digits_cnn", "num_clients": 4, "rounds": 3}


def test_equal_profiles_are_the_documented_defaults():
    profiles = client_profiles("equal", 3, seed=0, args={})
    assert profiles == [Profile(100e6, 100e6, 0.010, 10e9)] * 3
    custom = equal_profiles(2, np.random.default_rng(0), uplink_mbps=5, latency_ms=0, gflops=2)
    assert custom[0] == Profile(5e6, 100e6, 0.0, 2e9)


def test_shannon_rate_at_one_kilometre():
    # 23 dBm sent, 128.1 dB lost, noise -174 dBm/Hz over 10 MHz = -104 dBm: SNR -1.1 dB
    snr = 10 ** ((23 - 128.1 + 104) / 10)
    expected = 10e6 * math.log2(1 + snr)
    assert shannon_rate_bps(1.0, 10e6, 23.0, -174.0) == pytest.approx(expected)
    assert expected == pytest.approx(8.29e6, rel=1e-2)
    assert shannon_rate_bps(0.1, 10e6, 23.0, -174.0) > 10 * expected  # closer is much faster


def test_wireless_profiles_are_seeded_and_heterogeneous():
    a = client_profiles("wireless", 50, seed=1, args={})
    assert a == client_profiles("wireless", 50, seed=1, args={})  # every runtime draws the same
    assert a != client_profiles("wireless", 50, seed=2, args={})
    flops = np.array([p.flops for p in a])
    assert flops.min() >= 1e9 and flops.max() <= 1e10 and flops.std() > 1e9
    up = np.array([p.uplink_bps for p in a])
    down = np.array([p.downlink_bps for p in a])
    assert (down > up).all()  # the base station sends at 30 dBm, clients at 23
    near, far = shannon_rate_bps(0.1, 10e6, 23, -174), shannon_rate_bps(1.0, 10e6, 23, -174)
    assert far <= up.min() and up.max() <= near
    fixed = wireless_profiles(3, np.random.default_rng(0), gflops=[4, 4], distance_km=[0.5, 0.5])
    assert {p.flops for p in fixed} == {4e9} and len({p.uplink_bps for p in fixed}) == 1


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"network": "wirelss"}, "network", "did you mean 'wireless'"),
        ({"network_args": {"latency": 5}}, "network_args", "did you mean 'latency_ms'"),
        ({"network": "wireless", "network_args": {"distance_km": [1, 0.1]}}, "network_args",
         "distance_km must be [low, high]"),
        ({"network_args": {"uplink_mbps": 0}}, "network_args", "uplink_mbps must be a number > 0"),
        ({"server_gflops": 0}, "server_gflops", "must be > 0"),
        ({"search": {"network": ["equal", "wifi"]}}, "search.network", "unknown network 'wifi'"),
    ],
)  # fmt: skip
def test_bad_network_config_names_the_key(changes, key, words):
    with pytest.raises(ConfigError) as e:
        validate({**DIGITS, **changes})
    assert e.value.key == key and words in str(e.value)


def test_training_flops_count_forward_and_backward():
    info = describe_dataset("digits")
    split = build_model("digits_cnn", info)
    linear = torch.nn.Linear(10, 3)
    # forward 2·10·3, backward: weight gradient 2·10·3 and input gradient 2·10·3
    assert training_flops(linear, torch.zeros(1, 10)) == 3 * 2 * 10 * 3
    costs = compute_costs(validate(DIGITS))
    assert costs.client_model == training_flops(split.client, dummy_input(info)) > 0
    assert costs.server_model > 0 and costs.aux_model > 0
    assert split.client.training  # counting leaves the module's mode alone


def test_fedavg_round_time_by_hand():
    cfg = validate({**DIGITS, "algorithm": "fedavg"})
    clock, ledger, costs = planned_clock(cfg), planned_ledger(cfg), compute_costs(cfg)
    info = describe_dataset("digits")
    full = build_model("digits_cnn", info)
    model_bytes = sum(t.numel() * t.element_size() for t in full.client.state_dict().values())
    model_bytes += sum(t.numel() * t.element_size() for t in full.server.state_dict().values())
    per_client = []
    for n in clock.client_samples:
        compute = n * (costs.client_model + costs.server_model) / 10e9
        transfer = 2 * 8 * model_bytes / 100e6  # the model down and up
        per_client.append(compute + transfer + 2 * 0.010)  # two messages
    assert clock.round_seconds(1, ledger) == pytest.approx(max(per_client))  # no S-Server work
    assert [r["sim_time_s"] for r in planned_rounds(cfg)] == pytest.approx(
        [max(per_client) * t for t in (1, 2, 3)]
    )


def test_split_learning_adds_up_its_clients_and_the_server():
    """`sl` runs its clients one after another, splitfed_v2 in parallel; both wait for the
    S-Server, which steps on every sample."""
    for algorithm, combine in (("sl", sum), ("splitfed_v2", max)):
        cfg = validate({**DIGITS, "algorithm": algorithm, "server_gflops": 1.0})
        clock, ledger, costs = planned_clock(cfg), planned_ledger(cfg), compute_costs(cfg)
        clients = [clock.client_seconds(1, c, ledger.client_round_bytes(1, c)) for c in range(4)]
        server = sum(clock.client_samples) * costs.server_model / 1e9
        assert clock.server_seconds(1) == pytest.approx(server)
        assert clock.round_seconds(1, ledger) == pytest.approx(combine(clients) + server)
        # without bytes: compute, and one latency per message (per batch z up and ∂L/∂z
        # down, the client model down and up)
        batches = [math.ceil(n / cfg.batch_size) for n in clock.client_samples]
        compute = [n * costs.client_model / 10e9 for n in clock.client_samples]
        assert [clock.client_seconds(1, c, {}) for c in range(4)] == pytest.approx(
            [c + (2 * b + 2) * 0.010 for c, b in zip(compute, batches, strict=True)]
        )


def test_fsl_sage_alignment_rounds_cost_the_server_more():
    cfg = validate({**DIGITS, "align_interval": 2, "align_epochs": 5, "batch_size": 32})
    clock, costs = planned_clock(cfg), compute_costs(cfg)
    # uploads on k = 0, 5, 10, ...: every fifth full batch of 32 (the last batch may be short)
    uploaded = sum(
        min(32, n - k * 32) for n in clock.client_samples for k in range(0, math.ceil(n / 32), 5)
    )
    first = 32 * len(clock.client_samples)  # every client's first batch
    step = uploaded * costs.server_model

    def alignment(buffered: int) -> float:  # a target for each buffered sample, then 5 epochs
        return buffered * costs.server_model + 5 * buffered * 2 * costs.aux_model

    # round 1 aligns after each client's first upload: its buffer holds that batch
    assert clock.server_seconds(1) * 10e12 == pytest.approx(step + alignment(first))
    assert clock.server_seconds(2) * 10e12 == pytest.approx(step)  # no alignment
    # round 3 aligns on rounds 1 and 2's uploads and its own first batch
    assert clock.server_seconds(3) * 10e12 == pytest.approx(step + alignment(2 * uploaded + first))
    eager = planned_clock(cfg.replace(align_targets="eager"))
    # eager computes each target once at upload, lazy the whole buffer at every alignment
    assert eager.server_seconds(2) > clock.server_seconds(2)
    assert eager.server_seconds(3) < clock.server_seconds(3)


def test_a_slow_client_sets_the_pace_of_the_round():
    cfg = validate({**DIGITS, "algorithm": "cse_fsl", "network": "wireless"})
    clock, ledger = planned_clock(cfg), planned_ledger(cfg)
    clients = [clock.client_seconds(1, c, ledger.client_round_bytes(1, c)) for c in range(4)]
    assert len(set(clients)) == 4  # heterogeneous devices and links
    assert clock.round_seconds(1, ledger) == pytest.approx(max(clients) + clock.server_seconds(1))
    equal = planned_clock(cfg.replace(network="equal"))
    assert equal.round_seconds(1, ledger) != pytest.approx(clock.round_seconds(1, ledger))


def test_auto_network_is_gas_wireless_setting_and_equal_otherwise():
    assert validate(DIGITS).network_profile == "equal"
    gas = validate({**DIGITS, "algorithm": "gas"})
    assert gas.network == "auto" and gas.network_profile == "wireless"
    assert planned_clock(gas).profiles == client_profiles("wireless", 4, seed=0, args={})
    assert validate({**DIGITS, "algorithm": "gas", "network": "equal"}).network_profile == "equal"


def test_a_sweep_gives_every_trial_the_same_network():
    """`auto` in a sweep over algorithms that include gas is wireless for all of them, so their
    simulated times compare; without gas it stays equal; an explicit choice is kept."""
    from tune.space import trial_config

    mixed = {**DIGITS, "search": {"algorithm": ["gas", "fedavg"]}}
    assert validate(mixed).network_profile == "wireless"
    for algorithm in ("gas", "fedavg"):
        trial = trial_config(mixed, {"algorithm": algorithm})
        assert trial.network == "wireless" and trial.network_profile == "wireless"
    plain = {**DIGITS, "search": {"algorithm": ["sl", "fedavg"]}}
    assert trial_config(plain, {"algorithm": "sl"}).network_profile == "equal"
    chosen = {**DIGITS, "network": "equal", "search": {"algorithm": ["gas", "fedavg"]}}
    assert trial_config(chosen, {"algorithm": "gas"}).network_profile == "equal"
    both = {**DIGITS, "search": {"network": ["auto", "equal"], "algorithm": ["gas", "fedavg"]}}
    assert trial_config(both, {"algorithm": "gas", "network": "auto"}).network_profile == "wireless"
    assert trial_config(both, {"algorithm": "fedavg", "network": "auto"}).network == "auto"
