"""Communication ledger (SPEC §3): every byte that crosses the network, by round, client, kind
and direction. Bytes are numel × element_size of the tensors sent; models count parameters and
buffers (only what is communicated: trainable weights and persistent buffers)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

KINDS = ("activations", "gradients", "labels", "client_model", "server_model", "aux_model")
DIRECTIONS = ("up", "down")
GIB = 2**30

Key = tuple[int, int, str, str]  # (round, client, kind, direction)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor_bytes(t) for t in state.values())


class Ledger:
    """Byte counters keyed by (round, client, kind, direction); mergeable across processes."""

    def __init__(self, entries: Iterable[tuple[Key, int]] = ()):
        self._bytes: dict[Key, int] = defaultdict(int)
        for key, n in entries:
            self._bytes[key] += n

    def record(self, round: int, client: int, kind: str, direction: str, nbytes: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown transfer kind {kind!r}; allowed: {KINDS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; allowed: {DIRECTIONS}")
        self._bytes[(round, client, kind, direction)] += int(nbytes)

    def entries(self) -> list[tuple[Key, int]]:
        """Plain tuples: what a client sends back with its round report."""
        return list(self._bytes.items())

    def merge(self, other: Ledger | Iterable[tuple[Key, int]]) -> None:
        for key, n in other.entries() if isinstance(other, Ledger) else other:
            self._bytes[key] += n

    def rounds(self) -> list[int]:
        return sorted({k[0] for k in self._bytes})

    def round_summary(self, round: int) -> dict:
        """{"round", "up_bytes", "down_bytes", "by_kind": {kind: {"up": b, "down": b}}}."""
        by_kind: dict[str, dict[str, int]] = {}
        for (t, _client, kind, direction), n in sorted(self._bytes.items()):
            if t == round:
                by_kind.setdefault(kind, {"up": 0, "down": 0})[direction] += n
        up = sum(v["up"] for v in by_kind.values())
        down = sum(v["down"] for v in by_kind.values())
        return {"round": round, "up_bytes": up, "down_bytes": down, "by_kind": by_kind}

    def client_round_bytes(self, round: int, client: int) -> dict[tuple[str, str], int]:
        return {
            (kind, direction): n
            for (t, c, kind, direction), n in self._bytes.items()
            if t == round and c == client
        }

    def total_bytes(self, direction: str | None = None, through_round: int | None = None) -> int:
        return sum(
            n
            for (t, _c, _k, d), n in self._bytes.items()
            if (direction is None or d == direction)
            and (through_round is None or t <= through_round)
        )

    def gib(self, direction: str | None = None, through_round: int | None = None) -> float:
        return self.total_bytes(direction, through_round) / GIB


def format_round_table(summaries: list[dict]) -> str:
    """The dry-run table: one line per round with per-kind bytes and cumulative GiB (and the
    cumulative simulated time, where the summaries carry `sim_time_s`)."""
    kinds = [k for k in KINDS if any(k in s["by_kind"] for s in summaries)]
    timed = bool(summaries) and all("sim_time_s" in s for s in summaries)
    header = ["round", *[f"{k} up/down (MiB)" for k in kinds], "round GiB", "total GiB"]
    header += ["sim time (s)"] if timed else []
    rows, total = [], 0
    for s in summaries:
        round_bytes = s["up_bytes"] + s["down_bytes"]
        total += round_bytes
        cells = [str(s["round"])]
        for k in kinds:
            v = s["by_kind"].get(k, {"up": 0, "down": 0})
            cells.append(f"{v['up'] / 2**20:.2f} / {v['down'] / 2**20:.2f}")
        cells += [f"{round_bytes / GIB:.4f}", f"{total / GIB:.4f}"]
        cells += [f"{s['sim_time_s']:.1f}"] if timed else []
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *rows])
