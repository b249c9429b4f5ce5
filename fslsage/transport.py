"""How a client's round meets the network: the ledger-booking ServerLink and the client-round
executor shared by the in-process runtime and the Ray client actors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from fslsage.algorithms.base import Algorithm, Client, ClientReport, State, clone_state
from fslsage.ledger import Ledger, state_bytes, tensor_bytes
from fslsage.models import communicated_state

# send(method, client_id, *args): delivers one request to the S-Server, returns its answer.
Send = Callable[..., Any]


class RecordingLink:
    """A `ServerLink` that books every transfer in the client's round ledger (SPEC §3) and hands
    the request to `send`, which is a method call in-process or an actor call on Ray."""

    def __init__(self, cid: int, t: int, ledger: Ledger, send: Send):
        self.cid, self.t, self.ledger, self.send = cid, t, ledger, send

    def _book(self, kind: str, direction: str, nbytes: int) -> None:
        self.ledger.record(self.t, self.cid, kind, direction, nbytes)

    def _book_upload(self, z: Tensor, y: Tensor) -> None:
        self._book("activations", "up", tensor_bytes(z))
        self._book("labels", "up", tensor_bytes(y))

    def upload(self, z: Tensor, y: Tensor) -> None:
        self._book_upload(z, y)
        self.send("upload", self.cid, z, y)

    def exchange(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self._book_upload(z, y)
        grad, loss = self.send("exchange", self.cid, z, y)
        self._book("gradients", "down", tensor_bytes(grad))
        return grad, loss

    def aligned_aux(self) -> State:
        state = self.send("align", self.cid)
        self._book("aux_model", "down", state_bytes(state))
        return state


def local_send(server) -> Send:
    """In-process delivery: call the S-Server role's handler directly."""
    return lambda method, cid, *args: getattr(server, f"on_{method}")(cid, *args)


def run_client_round(
    algo: Algorithm, client: Client, shard, t: int, global_weights: dict[str, State], send: Send
) -> ClientReport:
    """Client i's round: global weights down, the algorithm's local work, its parts back up."""
    ledger = Ledger()
    for part, state in global_weights.items():
        client.parts[part].load_state_dict(state, strict=False)
        ledger.record(t, client.cid, part, "down", state_bytes(state))
    for module in client.parts.values():
        module.train()
    batches = shard.batches(algo.cfg.batch_size, algo.cfg.local_epochs, client.generator)
    loss = algo.train_round(client, batches, RecordingLink(client.cid, t, ledger, send), t)
    weights = {p: clone_state(communicated_state(client.parts[p])) for p in algo.federated_parts}
    for part, state in weights.items():
        ledger.record(t, client.cid, part, "up", state_bytes(state))
    return ClientReport(client.cid, client.num_samples, weights, float(loss), ledger.entries())
