"""One flat, typed experiment config: YAML file + `--set key=value` overrides, validated up front.

Every CLI loads its config through `load_config`; a bad config raises `ConfigError`, which the
CLIs print as one line naming the key (exit code 2) before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config problem, always attributed to one key."""

    def __init__(self, key: str, message: str):
        self.key = key
        # Always one line: the CLIs print it as the whole error (YAML and torch messages wrap).
        message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        super().__init__(f"{key}: {message}")


@dataclass
class Config:
    name: str = "experiment"
    algorithm: str = "fsl_sage"
    model: str = "digits_cnn"
    model_args: dict = field(default_factory=dict)
    dataset: str = "digits"
    dataset_args: dict = field(default_factory=dict)
    data_dir: str = "data"
    download: bool = True
    partition: str = "dirichlet"
    alpha: float = 1.0
    shards_per_client: int = 2
    num_clients: int = 10
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 256
    # the S-Server evaluates one such batch at a time between requests: a request never waits
    # behind more than one
    eval_batch_size: int = 128
    # adamw: decoupled weight decay (LoRA's E2E setup); adam adds the decay to the gradient
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd's
    grad_clip: float = 0.0  # the gradient norm of each model clipped to this before a step; 0: off
    # the client and server models' lr per round: constant, or linear warm-up over
    # `warmup_rounds` then linear decay (lr × min(t / warmup_rounds, (rounds − t + 1) /
    # (rounds − warmup_rounds))); the auxiliary models keep aux_lr
    lr_schedule: Literal["constant", "warmup_linear"] = "constant"
    warmup_rounds: int = 0
    # training losses only (client, server, aux); test_loss stays the plain NLL, so
    # test_perplexity = exp(test_loss)
    label_smoothing: float = 0.0
    server_update_interval: int = 5  # q
    align_interval: int = 10  # l
    # the first round fsl_sage aligns in, then every l-th: 1 as the reference (its t = 0); l
    # aligns in rounds l, 2l, ... (clients train their first l − 1 rounds on the initial aux)
    first_align_round: int = 1
    align_buffer_size: int = 1000
    align_epochs: int = 100
    align_batch_size: int = 1000
    # the auxiliary models' own optimizer (the reference's: Adam 1e-3, no weight decay), for
    # cse_fsl's client-side steps and fsl_sage's alignment alike
    aux_optimizer: Literal["adam", "sgd"] = "adam"
    aux_lr: float = 1e-3
    aux_weight_decay: float = 0.0
    # fsl_sage's alignment targets ∂L/∂z: the server in train mode (the reference: BN over the
    # buffer, running statistics updated) or eval mode (no side effects)
    align_target_mode: Literal["train", "eval"] = "train"
    align_targets: Literal["lazy", "eager"] = "lazy"
    # stateless (sl, splitfed_v2): replicas answer from published weights, a reducer steps
    server_mode: Literal["stateful", "stateless"] = "stateful"
    server_replicas: int = 2  # runtime ray: replica actors (in-process, one replica serves)
    sync_every: int = 0  # the reducer steps every this many gradients; 0: once a round
    gradient_store: Literal["object_store", "files"] = "object_store"
    gradient_store_path: str = ""  # files: a directory every node sees; "": a temporary one
    warm_start: bool = False  # aux algorithms: round 0 is one round of cse_fsl
    # gas (asynchronous): a round is one global iteration
    local_iters: int = 20  # a client's steps before it uploads its model
    model_buffer: int = 10  # uploaded models averaged into one global iteration
    activation_buffer: int = 10  # batches the S-Server collects before its step
    per_label: int = 0  # real + generated activations per label in a server step; 0: batch_size
    active_clients: int = 0  # clients training at once; 0: all
    # label-wise Gaussians: full covariance, its diagonal, or auto (diag above 1024 features)
    activation_covariance: Literal["auto", "full", "diag"] = "auto"
    # each activation's weight in them: its client's progress count (the authors' code: newer
    # activations weigh more) or 1 (plain count-weighted moments)
    activation_weighting: Literal["progress", "count"] = "progress"
    server_lr_decay: bool = False  # server lr η₀/√t in global iteration t
    comm_budget_gib: float = 200.0
    # client profiles (SPEC §6): a name in fslsage.simulation.PROFILES, or auto (see below)
    network: str = "auto"
    network_args: dict = field(default_factory=dict)
    server_gflops: float = 10000.0  # the S-Server's FLOP/s in the simulated clock, in GFLOP/s
    target_acc: float = 0.8
    seed: int = 0
    # torch intra-op threads of every process that computes: the in-process runtime, each
    # client actor, the S-Server and its replicas. One count for both runtimes, because the
    # thread count changes how reductions are summed, so the runtimes agree only with the same
    threads: int = 1
    # on a GPU: deterministic cuDNN/cuBLAS kernels and no TF32 in every process that computes,
    # so the runtimes agree there as they do on the CPU; off: cuDNN picks its fastest kernels
    deterministic: bool = False
    # bf16 autocast of client, aux and server compute and of evaluation (what travels stays
    # float32, as the dry-run plans it); channels_last: convolution weights in NHWC layout
    amp: Literal["off", "bf16"] = "off"
    channels_last: bool = False
    runtime: Literal["local", "ray"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    client_gpus: float = 0.0
    server_gpus: float = 0.0
    client_cpus: float = 1.0  # per client actor (runtime: ray)
    num_client_actors: int = 0  # 0: as many as the cluster's CPUs (and GPUs) hold
    server_accelerator: str = ""  # Ray accelerator type the S-Server asks for, e.g. "A100"
    server_batching: Literal["exact", "coalesce"] = "exact"
    max_batch: int = 8
    max_wait_ms: float = 5.0
    # the S-Server's per-client state (fsl_sage's aux models, their optimizers and alignment
    # buffers; splitfed_v1's server copies) on its device only while that client is served, on
    # the CPU otherwise: auto = where the S-Server computes on CUDA (not on/off: YAML reads
    # those as booleans)
    offload_client_state: Literal["auto", "always", "never"] = "auto"
    # the whole experiment to <out>/checkpoints/ every this many rounds (a Ray run also keeps
    # one in the object store to recover lost actors); 0: never
    checkpoint_every: int = 10
    # also after any round that ends this many minutes after the last checkpoint (paper rounds
    # can take minutes each); 0: by rounds only. Needs checkpoint_every > 0
    checkpoint_minutes: float = 5.0
    # the figures' GiB and simulated-time axes: log where the data spans more than two decades
    plot_x_scale: Literal["auto", "log", "linear"] = "auto"
    search: dict = field(default_factory=dict)

    @property
    def network_profile(self) -> str:
        """`network` with "auto" resolved: the algorithm's own setting (`Algorithm.network`:
        wireless for gas, as its paper), else all equal. A sweep resolves it once for all its
        trials (their times must compare): wireless if any of them can run an algorithm that
        asks for it. An unknown algorithm (validation names it) asks for nothing."""
        if self.network != "auto":
            return self.network
        from fslsage.algorithms import ALGORITHMS

        algorithms = search_choices(self.search.get("algorithm")) or [self.algorithm]
        asked = {ALGORITHMS.get(a).network for a in algorithms if a in ALGORITHMS}
        return "wireless" if "wireless" in asked else "equal"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return validate({**self.to_dict(), **changes})


FIELDS = {f.name: f for f in fields(Config)}
_TYPES = get_type_hints(Config)
FIELD_TYPES = _TYPES  # key → annotated type, for the sweep's search-space translation

# Range rules for numeric keys, checked after types.
_POSITIVE = ("alpha", "lr", "aux_lr", "comm_budget_gib", "client_cpus", "server_gflops")
_AT_LEAST_ONE = (
    "num_clients", "rounds", "local_epochs", "batch_size", "eval_batch_size", "shards_per_client",
    "server_update_interval", "align_interval", "align_buffer_size", "align_epochs",
    "align_batch_size", "first_align_round", "max_batch", "local_iters", "model_buffer",
    "activation_buffer", "server_replicas", "threads",
)  # fmt: skip
_NON_NEGATIVE = (
    "weight_decay", "aux_weight_decay", "momentum", "grad_clip", "warmup_rounds", "client_gpus",
    "server_gpus", "max_wait_ms", "checkpoint_every", "num_client_actors", "per_label",
    "active_clients", "sync_every", "checkpoint_minutes",
)  # fmt: skip

MAX_ROUNDS = 100_000  # far beyond any paper run; a typo like 10**12 must not plan for ever
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes no more
NAME_MAX = 100  # characters of `name`: one folder name, well within any file system's limit

SEARCH_SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCH_OPTIONS = (
    "num_samples", "scheduler", "metric", "mode", "grace_gib", "reduction_factor",
    "max_concurrent", "max_failures",
)  # fmt: skip
SEARCH_SCHEDULERS = ("fifo", "asha")
SEARCH_METRICS = {  # metric: its mode
    "test_acc": "max", "test_loss": "min", "test_perplexity": "min", "train_loss": "min",
}  # fmt: skip


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any) -> Any:
    """Return the value coerced where lossless (int → float), else raise ConfigError."""
    tp = _TYPES[key]
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"got {value!r}{hint}; allowed: {_type_name(tp)}")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[tp]
    if not ok:
        raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {value!r}")
    return value


def _check_range(cfg: Config) -> None:
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, f"must be > 0, got {getattr(cfg, key)!r}")
    for key in _AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(cfg, key)!r}")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {getattr(cfg, key)!r}")
    if not 0.0 <= cfg.target_acc <= 1.0:
        raise ConfigError("target_acc", f"must be in [0, 1], got {cfg.target_acc!r}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError("label_smoothing", f"must be in [0, 1), got {cfg.label_smoothing!r}")
    if cfg.lr_schedule == "warmup_linear" and cfg.warmup_rounds >= cfg.rounds:
        raise ConfigError(
            "warmup_rounds",
            f"must be < rounds={cfg.rounds} (the decay needs a round), got {cfg.warmup_rounds}",
        )
    if cfg.client_gpus > 1:
        raise ConfigError(
            "client_gpus", f"a client actor gets at most 1 GPU, got {cfg.client_gpus}"
        )
    if cfg.active_clients > cfg.num_clients:
        raise ConfigError(
            "active_clients",
            f"at most num_clients={cfg.num_clients} can train at once, got {cfg.active_clients}",
        )
    if cfg.rounds > MAX_ROUNDS:
        raise ConfigError("rounds", f"must be <= {MAX_ROUNDS:,}, got {cfg.rounds:,}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError("seed", f"must be in [0, 2**32 - 1], got {cfg.seed}")
    _check_name(cfg.name)
    store = cfg.gradient_store_path
    if store and Path(store).exists() and not Path(store).is_dir():
        raise ConfigError("gradient_store_path", f"{store} exists and is not a directory")


def _check_name(name: str) -> None:
    """`name` becomes one folder under the results directory (and a sweep replaces it): a plain
    file name, so no name reaches outside it (`..`, `/`) or fails late in the file system."""
    plain = (
        0 < len(name) <= NAME_MAX
        and name not in (".", "..")
        and not any(c in name for c in "/\\")
        and name.isprintable()  # no NUL, newline or other control characters
    )
    if not plain:
        shown = repr(name if len(name) <= 40 else name[:40] + "...")
        raise ConfigError(
            "name",
            f"must be a plain folder name (1-{NAME_MAX} printable characters, no '/', '\\' or "
            f"NUL, not '.' or '..'), got {shown} ({len(name)} characters)",
        )


def _check_registries(cfg: Config) -> None:
    """Registry names, dataset/model compatibility and builder arguments (models built on meta)."""
    import torch

    from fslsage.algorithms import ALGORITHMS
    from fslsage.data import DATASETS, PARTITIONS, describe_dataset
    from fslsage.data.base import CLASSIFICATION
    from fslsage.models import MODELS, ModelArgError, build_model
    from fslsage.registry import UnknownNameError
    from fslsage.simulation import PROFILES, client_profiles

    for key, registry, value in (
        ("algorithm", ALGORITHMS, cfg.algorithm), ("dataset", DATASETS, cfg.dataset),
        ("partition", PARTITIONS, cfg.partition), ("network", PROFILES, cfg.network_profile),
    ):  # fmt: skip
        try:
            registry.get(value)
        except UnknownNameError as e:
            if key == "network":  # "auto" is a valid answer too
                e = UnknownNameError(key, value, [*e.allowed, "auto"])
            raise ConfigError(key, str(e)) from None
    try:
        client_profiles(cfg.network_profile, cfg.num_clients, cfg.seed, cfg.network_args)
    except (TypeError, ValueError) as e:
        raise ConfigError("network_args", str(e)) from None
    try:
        info = describe_dataset(cfg.dataset, **cfg.dataset_args)
    except (TypeError, ValueError) as e:  # an unknown dataset_arg or a bad value of one
        raise ConfigError("dataset_args", str(e)) from None
    if cfg.search.get("metric") == "test_perplexity" and info.task == CLASSIFICATION:
        raise ConfigError(
            "search.metric", f"test_perplexity is a language model's; {cfg.dataset} has classes"
        )
    if ALGORITHMS.get(cfg.algorithm).needs_class_labels and info.task != CLASSIFICATION:
        raise ConfigError("algorithm", f"{cfg.algorithm} needs class labels; {cfg.dataset} is "
                          f"{info.task}")  # fmt: skip
    if cfg.num_clients > info.num_train:
        raise ConfigError(
            "num_clients",
            f"{cfg.num_clients} clients but {cfg.dataset} has {info.num_train} samples",
        )
    shards = cfg.num_clients * cfg.shards_per_client
    if cfg.partition == "shards" and shards > info.num_train:
        raise ConfigError(
            "shards_per_client",
            f"{cfg.num_clients} clients x {cfg.shards_per_client} shards = {shards} shards but "
            f"{cfg.dataset} has {info.num_train} samples",
        )
    try:
        with torch.device("meta"):
            build_model(cfg.model, info, **cfg.model_args)
    except UnknownNameError as e:
        raise ConfigError("model", str(e)) from None
    except ModelArgError as e:
        raise ConfigError("model_args", str(e)) from None
    except (TypeError, ValueError) as e:
        # A dataset the model cannot take is the model's fault; any other builder complaint
        # (a bad aux_variant, client_layers out of range, ...) comes from a model_arg's value.
        incompatible = "cannot be used with dataset" in str(e) or not cfg.model_args
        raise ConfigError("model" if incompatible else "model_args", str(e)) from None
    for key, registry in (
        ("algorithm", ALGORITHMS), ("dataset", DATASETS), ("partition", PARTITIONS),
        ("model", MODELS), ("network", PROFILES),
    ):  # fmt: skip
        for value in search_choices(cfg.search.get(key)):
            if key == "network" and value == "auto":
                continue
            try:
                registry.get(value)
            except UnknownNameError as e:
                raise ConfigError(f"search.{key}", str(e)) from None
    if cfg.server_mode == "stateless":
        _require_algorithms(cfg, "server_mode", "stateless_server", "stateless replicas serve "
                            "one shared server model that answers with gradients")  # fmt: skip
    if cfg.lr_schedule != "constant":
        why = "a per-round lr schedule needs synchronous rounds (gas has server_lr_decay)"
        _require_algorithms(cfg, "lr_schedule", lambda a: not a.asynchronous, why)
    if cfg.warm_start:
        _require_algorithms(cfg, "warm_start", "uses_aux", "a warm start is one round of "
                            "cse_fsl for an algorithm with an auxiliary model")  # fmt: skip


def _require_algorithms(
    cfg: Config, key: str, capability: str | Callable[[type], bool], why: str
) -> None:
    """Every algorithm the config can run (its own, or its sweep's) has the class attribute
    `capability` set (or passes it, a test of the class), or a ConfigError on `key` names the
    first that has not."""
    from fslsage.algorithms import ALGORITHMS

    def able(name: str) -> bool:
        cls = ALGORITHMS.get(name)
        return capability(cls) if callable(capability) else getattr(cls, capability)

    lacking = [a for a in search_choices(cfg.search.get("algorithm")) or [cfg.algorithm]
               if not able(a)]  # fmt: skip
    if lacking:
        names = ", ".join(n for n in ALGORITHMS.names() if able(n))
        raise ConfigError(key, f"{why} ({names}); {lacking[0]} cannot")


def search_choices(spec: Any) -> list:
    """The discrete values a search entry can take (a list, {grid: [...]} or {choice: [...]}),
    else [] (a continuous sampler, or no entry)."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        ((sampler, values),) = spec.items()
        if sampler in ("grid", "choice") and isinstance(values, list):
            return values
    return []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def max_budget_gib(cfg: Config) -> float:
    """The largest communication budget any trial of the sweep can get (ASHA's max_t)."""
    spec = cfg.search.get("comm_budget_gib")
    values = search_choices(spec)
    if isinstance(spec, dict) and not values:  # uniform/loguniform/randint: the upper bound
        values = [next(iter(spec.values()))[1]]
    return float(max([cfg.comm_budget_gib, *values]))


def _check_search_options(cfg: Config) -> None:
    """The sweep's own options in `search` (how many samples, which scheduler, ...): checked here
    so a bad one is a one-line config error before Ray starts, not a Tune traceback."""
    search = cfg.search
    n = search.get("num_samples", 1)
    if not _is_int(n) or n < 1:
        raise ConfigError("search.num_samples", f"must be an int >= 1, got {n!r}")
    n = search.get("max_failures", 0)
    if not _is_int(n) or n < 0:
        raise ConfigError(
            "search.max_failures", f"must be an int >= 0 (retries of a failed trial), got {n!r}"
        )
    n = search.get("max_concurrent", 0)
    if not _is_int(n) or n < 0:
        raise ConfigError(
            "search.max_concurrent", f"must be an int >= 0 (0: as resources allow), got {n!r}"
        )
    scheduler = search.get("scheduler", "fifo")
    if scheduler not in SEARCH_SCHEDULERS:
        raise ConfigError(
            "search.scheduler", f"got {scheduler!r}; allowed: {', '.join(SEARCH_SCHEDULERS)}"
        )
    metric = search.get("metric", "test_acc")
    if metric not in SEARCH_METRICS:
        raise ConfigError("search.metric", f"got {metric!r}; allowed: {', '.join(SEARCH_METRICS)}")
    mode = search.get("mode", SEARCH_METRICS[metric])
    if mode not in ("max", "min"):
        raise ConfigError("search.mode", f"got {mode!r}; allowed: 'max', 'min'")
    rf = search.get("reduction_factor", 4)
    if not _is_number(rf) or not rf > 1:
        raise ConfigError("search.reduction_factor", f"must be a number > 1, got {rf!r}")
    grace = search.get("grace_gib")
    if scheduler == "asha":
        # GiB per round differ by orders of magnitude between models: no useful default exists.
        if grace is None:
            raise ConfigError(
                "search.grace_gib", "scheduler asha needs grace_gib (GiB before a first cut)"
            )
        budget = max_budget_gib(cfg)
        if not _is_number(grace) or not 0 < grace < budget:
            raise ConfigError(
                "search.grace_gib",
                f"must be a number in (0, comm_budget_gib={budget}), got {grace!r}",
            )
    else:
        for key in ("grace_gib", "reduction_factor"):
            if key in search:
                raise ConfigError(f"search.{key}", "only goes with scheduler: asha")


def _check_search(cfg: Config) -> None:
    """`search` maps config keys to a list (grid) or {sampler: args}; plus a few Tune options.
    Every value a trial could get must pass the same type and range checks as the key itself."""
    for key, spec in cfg.search.items():
        where = f"search.{key}"
        if key in SEARCH_OPTIONS:
            continue
        if key not in FIELDS or key == "search":
            raise ConfigError(where, _unknown_key_message(key, extra=SEARCH_OPTIONS))
        if isinstance(spec, list):
            values = spec
        elif isinstance(spec, dict) and len(spec) == 1:
            sampler, values = next(iter(spec.items()))
            if sampler not in SEARCH_SAMPLERS:
                close = difflib.get_close_matches(str(sampler), SEARCH_SAMPLERS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    where,
                    f"unknown sampler {sampler!r}{hint}; allowed: {', '.join(SEARCH_SAMPLERS)}",
                )
            if sampler in ("uniform", "loguniform", "randint"):
                if _TYPES[key] not in (int, float):
                    raise ConfigError(
                        where, f"{sampler} needs a numeric key, {key} is {_type_name(_TYPES[key])}"
                    )
                numeric = all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    for v in (values if isinstance(values, list) else [])
                )
                if not (isinstance(values, list) and len(values) == 2 and numeric):
                    raise ConfigError(where, f"{sampler} takes [low, high] numbers, got {values!r}")
                if values[0] >= values[1]:
                    raise ConfigError(where, f"{sampler} needs low < high, got {values!r}")
                if sampler == "loguniform" and values[0] <= 0:
                    raise ConfigError(where, f"loguniform needs 0 < low, got {values!r}")
        else:
            raise ConfigError(
                where, f"expected a list of values or {{sampler: args}}, got {spec!r}"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(where, f"expected a non-empty list, got {values!r}")
        for v in values:
            try:
                value = _check_type(key, v)
                _check_range(dataclasses.replace(cfg, **{key: value}))
            except ConfigError as e:
                raise ConfigError(where, str(e).split(": ", 1)[1]) from None
    _check_search_options(cfg)


def _unknown_key_message(key: str, extra: tuple[str, ...] = ()) -> str:
    names = list(FIELDS) + list(extra)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; allowed: {', '.join(names)}"


def validate(raw: dict[str, Any], check_registries: bool = True) -> Config:
    """Build a Config from a plain dict, or raise ConfigError naming the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("<config>", f"expected a mapping of keys, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        if key not in FIELDS:
            raise ConfigError(str(key), _unknown_key_message(str(key)))
        values[key] = _check_type(key, value)
    cfg = Config(**values)
    _check_range(cfg)
    _check_search(cfg)
    if check_registries:
        _check_registries(cfg)
    return cfg


class _Loader(yaml.SafeLoader):
    """YAML as people write it: `1e-3` and `5E4` are floats (YAML 1.2), not strings (1.1)."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    """A key written twice is a mistake (which one was meant?), not a silent last-one-wins."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float | bool):
            continue  # unhashable keys are rejected by the mapping constructor itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what went wrong and where (1-based line, column)."""
    problem = getattr(e, "problem", None) or str(e)
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings → nested dict; values parse as YAML, dotted keys reach into blocks."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(pair, "override must look like key=value")
        dotted, text = pair.split("=", 1)
        try:
            value = _load_yaml(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                dotted, f"value {text!r} is not valid YAML: {_yaml_problem(e)}"
            ) from None
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, "cannot set a field inside a non-mapping value")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: nested dicts (search, model_args, dataset_args) merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, check_registries: bool = True
) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError("--config", f"{path} is a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError("--config", f"no such file: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError("--config", f"{path} is not a text (UTF-8 YAML) file") from None
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror or e}") from None
        if "\0" in text:
            raise ConfigError("--config", f"{path} is not a text (UTF-8 YAML) file")
        try:
            raw = _load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of keys")
    raw = merge(raw, parse_overrides(overrides or []))
    return validate(raw, check_registries=check_registries)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: MLflow params and parquet columns."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
