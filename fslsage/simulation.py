"""Network and speed simulation (SPEC §6): every client gets a profile (bandwidths, latency,
compute speed) from a named distribution, and each round gets a simulated wall-clock time from
the round's ledger, the FLOPs its algorithm declares and those profiles:

    client i:  its FLOPs / its FLOP/s  +  8 · bytes up / uplink  +  8 · bytes down / downlink
               +  latency · messages
    round:     the slowest client (with stages, `Algorithm.round_stages`: the sum of each
               stage's slowest; `sl`'s relay, one client a stage, adds up its clients)
               +  the S-Server's FLOPs of the round / server FLOP/s

Results carry the cumulative time as `sim_time_s` next to `comm_gib`, so time-to-accuracy can be
compared as well as bytes. It is a model of a deployment, not a measurement of this machine.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fslsage.algorithms.base import Algorithm, ComputeCosts, TrafficSizes, Transfer
from fslsage.data import local_batch_sizes
from fslsage.ledger import Ledger
from fslsage.registry import Registry


@dataclass(frozen=True)
class Profile:
    """One client's link and device."""

    uplink_bps: float  # bits per second, client → servers
    downlink_bps: float  # bits per second, servers → client
    latency_s: float  # per message, one way
    flops: float  # FLOP/s of the client's device

    def seconds(self, flops: float, up_bytes: int, down_bytes: int, messages: int) -> float:
        """Compute at this device's speed, bytes over its links, one latency per message."""
        return (
            flops / self.flops
            + 8 * up_bytes / self.uplink_bps
            + 8 * down_bytes / self.downlink_bps
            + messages * self.latency_s
        )


def traffic_totals(transfers: Iterable[Transfer]) -> tuple[int, int, int]:
    """(bytes up, bytes down, messages) of (kind, direction, bytes) transfers; labels travel in
    the message of their activations."""
    up = down = messages = 0
    for kind, direction, nbytes in transfers:
        up += nbytes if direction == "up" else 0
        down += nbytes if direction == "down" else 0
        messages += kind != "labels"
    return up, down, messages


# name → fn(num_clients, rng, **network_args) -> one Profile per client
ProfileDistribution = Callable[..., list[Profile]]
PROFILES: Registry[ProfileDistribution] = Registry("network")


def _range(name: str, value: Sequence[float], positive: bool = True) -> tuple[float, float]:
    """A [low, high] pair from network_args, checked."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not ok or value[0] > value[1] or (positive and value[0] <= 0):
        raise ValueError(f"{name} must be [low, high] with 0 < low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def _positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _latency_s(latency_ms: float) -> float:
    if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) or latency_ms < 0:
        raise ValueError(f"latency_ms must be a number >= 0, got {latency_ms!r}")
    return latency_ms / 1e3


@PROFILES.register("equal")
def equal_profiles(
    num_clients: int,
    rng: np.random.Generator,
    uplink_mbps: float = 100.0,
    downlink_mbps: float = 100.0,
    latency_ms: float = 10.0,
    gflops: float = 10.0,
) -> list[Profile]:
    """Every client alike (the default): a 100 Mbit/s link with 10 ms latency, 10 GFLOP/s."""
    _positive(uplink_mbps=uplink_mbps, downlink_mbps=downlink_mbps, gflops=gflops)
    one = Profile(uplink_mbps * 1e6, downlink_mbps * 1e6, _latency_s(latency_ms), gflops * 1e9)
    return [one] * num_clients


def shannon_rate_bps(
    distance_km: float, bandwidth_hz: float, power_dbm: float, noise_dbm_per_hz: float
) -> float:
    """B · log2(1 + SNR) with the 3GPP macro-cell path loss 128.1 + 37.6 · log10(d / km) dB."""
    path_loss_db = 128.1 + 37.6 * math.log10(distance_km)
    noise_dbm = noise_dbm_per_hz + 10 * math.log10(bandwidth_hz)
    snr = 10 ** ((power_dbm - path_loss_db - noise_dbm) / 10)
    return bandwidth_hz * math.log2(1 + snr)


@PROFILES.register("wireless")
def wireless_profiles(
    num_clients: int,
    rng: np.random.Generator,
    gflops: Sequence[float] = (1.0, 10.0),
    distance_km: Sequence[float] = (0.1, 1.0),
    bandwidth_mhz: float = 10.0,
    client_power_dbm: float = 23.0,
    server_power_dbm: float = 30.0,
    noise_dbm_per_hz: float = -174.0,
    latency_ms: float = 0.0,
) -> list[Profile]:
    """GAS's setting: compute ~ U(1, 10) GFLOP/s and distance ~ U(0.1, 1) km per client; each
    direction's rate from the Shannon formula over its own `bandwidth_mhz` channel (clients send
    at 23 dBm, the base station at 30 dBm, noise -174 dBm/Hz). At 1 km a client gets about
    8 Mbit/s up, at 0.1 km about 120 Mbit/s."""
    low_flops, high_flops = _range("gflops", gflops)
    near, far = _range("distance_km", distance_km)
    _positive(bandwidth_mhz=bandwidth_mhz)
    latency_s = _latency_s(latency_ms)
    speeds = rng.uniform(low_flops, high_flops, num_clients) * 1e9
    distances = rng.uniform(near, far, num_clients)
    hz = bandwidth_mhz * 1e6
    return [
        Profile(
            uplink_bps=shannon_rate_bps(d, hz, client_power_dbm, noise_dbm_per_hz),
            downlink_bps=shannon_rate_bps(d, hz, server_power_dbm, noise_dbm_per_hz),
            latency_s=latency_s,
            flops=float(speed),
        )
        for d, speed in zip(distances, speeds, strict=True)
    ]


def client_profiles(name: str, num_clients: int, seed: int, args: dict) -> list[Profile]:
    """The profiles of a run: seeded, so every runtime and every resumed run draws the same.
    An argument the distribution does not take is a ValueError naming what it does take."""
    distribution = PROFILES.get(name)
    allowed = list(inspect.signature(distribution).parameters)[2:]
    for arg in args:
        if arg not in allowed:
            close = difflib.get_close_matches(str(arg), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"network {name!r} got unknown network_arg {arg!r}{hint}; "
                f"allowed: {', '.join(allowed)}"
            )
    rng = np.random.default_rng([seed, 6])  # 6: the section of the SPEC; any fixed stream id
    return distribution(num_clients, rng, **args)


class RoundClock:
    """Simulated seconds of each round of one experiment (see the module docstring). gas keeps
    its own clock, an event schedule (`fslsage.algorithms.gas.AsyncSchedule`), on the same
    profiles, sizes and costs."""

    def __init__(
        self,
        algo: Algorithm,
        sizes: TrafficSizes,
        costs: ComputeCosts,
        client_samples: list[int],
        profiles: list[Profile],
        server_flops: float,
    ):
        self.algo, self.sizes, self.costs = algo, sizes, costs
        self.client_samples, self.profiles = client_samples, profiles
        self.server_flops = server_flops

    def _batches(self, cid: int) -> list[int]:
        cfg = self.algo.cfg
        return local_batch_sizes(self.client_samples[cid], cfg.batch_size, cfg.local_epochs)

    def client_seconds(
        self, t: int, cid: int, bytes_by_transfer: dict[tuple[str, str], int]
    ) -> float:
        """Client `cid`'s own time in round t: its compute, its booked bytes, and a latency
        per message of its planned transfers."""
        traffic, (client_flops, _) = self.plan(t, cid)
        up, down, _ = traffic_totals((k, d, n) for (k, d), n in bytes_by_transfer.items())
        _, _, messages = traffic_totals(traffic)
        return self.profiles[cid].seconds(client_flops, up, down, messages)

    def plan(self, t: int, cid: int) -> tuple[list, tuple[float, float]]:
        """Client `cid`'s planned transfers and FLOPs (client, S-Server) in round t."""
        return self.algo.planned_round(t, self._batches(cid), self.sizes, self.costs)

    def server_seconds(self, t: int) -> float:
        flops = sum(self.plan(t, cid)[1][1] for cid in range(len(self.client_samples)))
        return flops / self.server_flops

    def round_seconds(self, t: int, ledger: Ledger) -> float:
        clients = [
            self.client_seconds(t, cid, ledger.client_round_bytes(t, cid))
            for cid in range(len(self.client_samples))
        ]
        stages = self.algo.for_round(t).round_stages(list(range(len(clients))))
        slowest = sum(max(clients[cid] for cid in stage) for stage in stages)  # a stage's slowest
        return slowest + self.server_seconds(t)
