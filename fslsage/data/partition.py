"""How the train set is split over clients. Every partition is seeded and returns one sorted
int64 index array per client, disjoint across clients. All but `dirichlet_by_class` give each
client the same number of samples (so weighted and plain averages coincide, as in the FSL-SAGE
reference code); `dirichlet_by_class` (GAS's) gives clients unequal shares.

Language-modelling data has no class labels: callers pass `np.zeros(N)` as labels; `iid` is the
natural choice and `dirichlet`/`shards` then also degrade to random equal splits.
"""

from __future__ import annotations

import numpy as np

from fslsage.data.registries import PARTITIONS


def _client_size(n: int, num_clients: int) -> int:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ValueError(f"cannot split {n} samples over {num_clients} clients")
    return n // num_clients


@PARTITIONS.register("iid")
def iid(
    labels: np.ndarray, num_clients: int, *, alpha: float, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """A random permutation cut into equal blocks (the remainder N mod m is left unused)."""
    size = _client_size(len(labels), num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(block) for block in perm[: num_clients * size].reshape(num_clients, size)]


@PARTITIONS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, num_clients: int, *, alpha: float, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """FSL-SAGE's variant: client i draws class proportions p_i ~ Dir(alpha * 1_C) and is filled
    with exactly N // m samples drawn from p_i restricted to the classes that still have unused
    samples (renormalised as classes run out).

    Vectorised per client: draw multinomial counts, clamp them to what is left, and redraw the
    deficit over the remaining classes; each redraw exhausts at least one class, so a client
    needs at most C rounds. If all of p_i's mass sits on exhausted classes (tiny alpha makes
    p_i one-hot), fresh proportions are drawn from Dir(alpha) over the remaining classes.
    """
    if not alpha > 0:
        raise ValueError(f"dirichlet partition needs alpha > 0, got {alpha}")
    size = _client_size(len(labels), num_clients)
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    num_classes = len(classes)
    # each class's indices in random order; a client takes the next `count` unused ones
    pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(num_classes)]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros(num_classes, dtype=np.int64)
    parts = []
    for _ in range(num_clients):
        p = rng.dirichlet(np.full(num_classes, alpha))
        take = np.zeros(num_classes, dtype=np.int64)
        need = size
        while need > 0:
            avail = left - take
            q = np.where(avail > 0, p, 0.0)
            if q.sum() <= 0:
                q = np.zeros(num_classes)
                q[avail > 0] = rng.dirichlet(np.full(int((avail > 0).sum()), alpha))
                p = q
            draw = np.minimum(rng.multinomial(need, q / q.sum()), avail)
            take += draw
            need -= int(draw.sum())
        chosen = [pools[c][used[c] : used[c] + take[c]] for c in range(num_classes)]
        parts.append(np.sort(np.concatenate(chosen)))
        used += take
        left -= take
    return parts


MIN_CLIENT_SIZE = 10  # dirichlet_by_class: every client gets at least this many samples
MAX_DRAWS = 1000  # dirichlet_by_class: draws of the whole split before giving up


def _class_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """dirichlet_by_class's two generators: one draws how many samples of each class go where
    (so those counts depend only on the class sizes: the dry-run plans them without labels),
    the other which samples."""
    counts, order = np.random.SeedSequence([seed, 7]).spawn(2)
    return np.random.default_rng(counts), np.random.default_rng(order)


def _by_class_counts(
    class_sizes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """(classes, clients) sample counts of GAS's Dirichlet split (the authors' code,
    utils/dataset.py: Dirichlet): class by class, proportions over the clients ~ Dir(alpha · 1),
    zeroed for clients that already hold N / m samples or more, renormalised, and the class cut
    at the floored cumulative proportions; the whole split is drawn again until every client
    holds at least MIN_CLIENT_SIZE samples."""
    if not alpha > 0:
        raise ValueError(f"dirichlet_by_class partition needs alpha > 0, got {alpha}")
    total = int(class_sizes.sum())
    if total < MIN_CLIENT_SIZE * num_clients:
        raise ValueError(f"cannot give each of {num_clients} clients {MIN_CLIENT_SIZE} of "
                         f"{total} samples")  # fmt: skip
    for _ in range(MAX_DRAWS):
        counts = np.zeros((len(class_sizes), num_clients), dtype=np.int64)
        held = np.zeros(num_clients, dtype=np.int64)
        open_ = held < total / num_clients
        for k, size in enumerate(class_sizes):
            p = rng.dirichlet(np.full(num_clients, alpha)) * open_
            if p.sum() <= 0:  # all its mass on full clients (the authors' code divides by 0):
                p[open_] = rng.dirichlet(np.full(int(open_.sum()), alpha))  # over the others
            p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()
            cuts = (np.cumsum(p) * size).astype(np.int64)[:-1]
            counts[k] = np.diff(np.concatenate([[0], cuts, [size]]))
            held += counts[k]
            open_ = held < total / num_clients
        if held.min() >= MIN_CLIENT_SIZE:
            return counts
    raise ValueError(f"no split of alpha={alpha} gave each of {num_clients} clients "
                     f"{MIN_CLIENT_SIZE} samples in {MAX_DRAWS} draws")  # fmt: skip


@PARTITIONS.register("dirichlet_by_class")
def dirichlet_by_class(
    labels: np.ndarray, num_clients: int, *, alpha: float, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """GAS's variant: each class is spread over the clients by its own proportions
    ~ Dir(alpha · 1) (see `_by_class_counts`), so clients hold unequal numbers of samples."""
    _client_size(len(labels), num_clients)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts_rng, order_rng = _class_streams(seed)
    counts = _by_class_counts(np.bincount(inverse), num_clients, alpha, counts_rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(len(classes)):
        pool = order_rng.permutation(np.flatnonzero(inverse == k))
        for cid, piece in enumerate(np.split(pool, np.cumsum(counts[k])[:-1])):
            parts[cid].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


@PARTITIONS.register("shards")
def shards(
    labels: np.ndarray, num_clients: int, *, alpha: float, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into m*s equal shards, give each
    client s random shards, so a client sees about s labels."""
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    shard = _client_size(len(labels), num_shards)
    rng = np.random.default_rng(seed)
    # random order within a label, so which samples of a class form a shard is seeded too
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")][: num_shards * shard]
    pieces = order.reshape(num_shards, shard)
    owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(pieces[row].reshape(-1)) for row in owner]


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float = 1.0,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Run the registered partition `name` on 1-D train labels (a numpy array or CPU tensor)."""
    fn = PARTITIONS.get(name)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"partition {name!r} needs 1-D class labels, got shape {labels.shape}; "
            "for language-modelling data pass np.zeros(num_train)"
        )
    return fn(labels, num_clients, alpha=alpha, shards_per_client=shards_per_client, seed=seed)


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(m, C) per-client label counts: what gets logged to show how heterogeneous a split is."""
    labels = np.asarray(labels).astype(np.int64)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def client_sizes(
    name: str,
    num_train: int,
    num_clients: int,
    shards_per_client: int,
    *,
    alpha: float = 1.0,
    seed: int = 0,
    num_classes: int = 1,
) -> list[int]:
    """Samples per client that partition `name` gives, without labels (for the dry-run ledger).
    `dirichlet_by_class` depends on the class sizes: taken as balanced (num_train spread over
    num_classes as evenly as can be: exact for CIFAR-10/100 and the synthetic datasets)."""
    PARTITIONS.get(name)
    if name == "dirichlet_by_class":
        _client_size(num_train, num_clients)
        balanced = np.bincount(np.arange(num_train) % num_classes, minlength=num_classes)
        balanced = balanced[balanced > 0]  # as np.unique sees the labels
        counts = _by_class_counts(balanced, num_clients, alpha, _class_streams(seed)[0])
        return counts.sum(0).tolist()
    if name == "shards":
        return [shards_per_client * (num_train // (num_clients * shards_per_client))] * num_clients
    return [num_train // num_clients] * num_clients
