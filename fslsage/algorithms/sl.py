"""Vanilla split learning (Gupta & Raskar; Vepakomma et al.): one client at a time, round-robin.
One client model is passed from client to client; one server model steps on every batch."""

from __future__ import annotations

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import ClientReport
from fslsage.algorithms.splitfed_v2 import SplitFedV2


@ALGORITHMS.register("sl")
class SplitLearning(SplitFedV2):
    # Same client step and server as SplitFed v2; what differs is the schedule (the relay) and
    # the aggregate.

    def round_stages(self, cids: list[int]) -> list[list[int]]:
        """The relay: one client at a time, in id order, each starting from the client model
        the one before it handed on (the first from the global model)."""
        return [[cid] for cid in cids]

    def aggregate(self, reports: list[ClientReport]):
        """No averaging: the global client model is the one the last client handed on."""
        return dict(reports[-1].weights)
