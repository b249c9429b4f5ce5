"""Vanilla split learning (Gupta & Raskar; Vepakomma et al.): one client at a time, round-robin.
One client model is passed from client to client; one server model steps on every batch."""

from __future__ import annotations

from fslsage.algorithms import ALGORITHMS
from fslsage.algorithms.base import ClientReport
from fslsage.algorithms.splitfed_v2 import SplitFedV2


@ALGORITHMS.register("sl")
class SplitLearning(SplitFedV2):
    # Same client step and server as SplitFed v2; what differs is the schedule: the runtime runs
    # the clients one after another, each starting from the model the previous one handed on.
    sequential = True

    def aggregate(self, reports: list[ClientReport]):
        """No averaging: the global client model is the one the last client handed on."""
        return dict(reports[-1].weights)
