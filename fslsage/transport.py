"""How a client's round meets the network: the ledger-booking ServerLink and the client-round
executor shared by the in-process runtime and the Ray client actors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from fslsage.algorithms.base import (
    Algorithm,
    Client,
    ClientReport,
    State,
    clone_state,
    set_round_lr,
)  # fmt: skip
from fslsage.data import local_batch_sizes
from fslsage.ledger import Ledger, state_bytes, tensor_bytes
from fslsage.models import communicated_state
from fslsage.precision import as_sent, autocast

# send(method, client_id, *args, last=False): delivers one request to the S-Server, returns its
# answer; `last`: the client's last request of the round (the S-Server need not wait for more).
Send = Callable[..., Any]


class RecordingLink:
    """A `ServerLink` that books every transfer in the client's round ledger (SPEC §3) and hands
    the request to `send`, which is a method call in-process or an actor call on Ray. Given the
    number of requests the algorithm declares for the round (`Algorithm.server_requests`), it
    marks the last one and holds the algorithm to that count."""

    def __init__(self, cid: int, t: int, ledger: Ledger, send: Send, expected: int | None = None):
        self.cid, self.t, self.ledger, self.send = cid, t, ledger, send
        self.expected, self.sent = expected, 0

    def _request(self, method: str, *args: Any) -> Any:
        self.sent += 1
        if self.expected is not None and self.sent > self.expected:
            raise self._miscount(f"more than {self.expected}")
        return self.send(method, self.cid, *args, last=self.sent == self.expected)

    def close(self) -> None:
        """The round's work is done: it made exactly the requests declared."""
        if self.expected is not None and self.sent != self.expected:
            raise self._miscount(str(self.sent))

    def _miscount(self, made: str) -> RuntimeError:
        return RuntimeError(
            f"client {self.cid} made {made} S-Server requests in round {self.t}, "
            f"but its algorithm's server_requests() declared {self.expected}"
        )

    def _book(self, kind: str, direction: str, nbytes: int) -> None:
        self.ledger.record(self.t, self.cid, kind, direction, nbytes)

    def _book_upload(self, z: Tensor, y: Tensor) -> None:
        self._book("activations", "up", tensor_bytes(z))
        self._book("labels", "up", tensor_bytes(y))

    def upload(self, z: Tensor, y: Tensor) -> None:
        z = as_sent(z)
        self._book_upload(z, y)
        self._request("upload", z, y)

    def exchange(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        z = as_sent(z)
        self._book_upload(z, y)
        grad, loss = self._request("exchange", z, y)
        self._book("gradients", "down", tensor_bytes(grad))
        return grad, loss

    def aligned_aux(self) -> State:
        state = self._request("align")
        self._book("aux_model", "down", state_bytes(state))
        return state


def local_send(server) -> Send:
    """In-process delivery: call the S-Server role's handler directly."""
    return lambda method, cid, *args, last=False: getattr(server, f"on_{method}")(cid, *args)


def run_client_round(
    algo: Algorithm, client: Client, shard, t: int, global_weights: dict[str, State], send: Send
) -> ClientReport:
    """Client i's round: global weights down, the algorithm's local work, its parts back up.
    Round 0 (a warm start) is the warm-start algorithm's (`Algorithm.for_round`)."""
    algo = algo.for_round(t)
    ledger = Ledger()
    for part, state in global_weights.items():
        client.parts[part].load_state_dict(state, strict=False)
        ledger.record(t, client.cid, part, "down", state_bytes(state))
    for module in client.parts.values():
        module.train()
    cfg = algo.cfg
    set_round_lr((o for part, o in client.optimizers.items() if part != "aux_model"), cfg, t)
    batches = shard.batches(cfg.batch_size, cfg.local_epochs, client.generator)
    expected = algo.server_requests(t, local_batch_sizes(len(shard), cfg.batch_size,
                                                         cfg.local_epochs))  # fmt: skip
    link = RecordingLink(client.cid, t, ledger, send, expected)
    with autocast(cfg, next(client.parts["client_model"].parameters()).device):
        loss = algo.train_round(client, batches, link, t)
    link.close()
    weights = {p: clone_state(communicated_state(client.parts[p])) for p in algo.federated_parts}
    for part, state in weights.items():
        ledger.record(t, client.cid, part, "up", state_bytes(state))
    return ClientReport(client.cid, client.num_samples, weights, float(loss), ledger.entries())
