"""One flat, typed experiment config: YAML file + `--set key=value` overrides, validated up front.

Each key is declared once, in `Config`, with its type (strict: no bool for an int, no "3" for 3)
and limits; a rule between keys is a validator beside them. Every CLI loads its config through
`load_config`; a bad config raises `ConfigError`, which the CLIs print as one line naming the
key (exit code 2) before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic.functional_validators import AfterValidator, model_validator


class ConfigError(ValueError):
    """A config problem, always attributed to one key."""

    def __init__(self, key: str, message: str):
        self.key = key
        # Always one line: the CLIs print it as the whole error (YAML and torch messages wrap).
        self.message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        super().__init__(f"{key}: {self.message}")


MAX_ROUNDS = 100_000  # far beyond any paper run; a typo like 10**12 must not plan for ever
MAX_SEED = 2**32 - 1
NAME_MAX = 100  # characters of `name`: one folder name, well within any file system's limit
SEARCH_METRICS = {  # metric: its mode
    "test_acc": "max", "test_loss": "min", "test_perplexity": "min", "train_loss": "min",
}  # fmt: skip

_STRICT = ConfigDict(strict=True, allow_inf_nan=False)
# The limits most numeric keys share. A limit's `description` says why it is what it is and
# ends the key's error message.
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]  # 0 is a setting of its own ("off", "all"), said at the key


def _plain_name(name: str) -> str:
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
        raise ValueError(
            f"must be a plain folder name (1-{NAME_MAX} printable characters, no '/', '\\' or "
            f"NUL, not '.' or '..'), got {shown} ({len(name)} characters)"
        )
    return name


def _not_a_file(path: str) -> str:
    if path and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    return path


@dataclass(config=ConfigDict(**_STRICT, extra="forbid"))
class Config:
    """Every key of an experiment; `TypeAdapter(Config).json_schema()` lists their limits."""

    name: Annotated[str, AfterValidator(_plain_name)] = "experiment"
    algorithm: str = "fsl_sage"
    model: str = "digits_cnn"
    model_args: dict = field(default_factory=dict)
    dataset: str = "digits"
    dataset_args: dict = field(default_factory=dict)
    data_dir: str = "data"
    download: bool = True
    partition: str = "dirichlet"
    alpha: Positive = 1.0
    shards_per_client: AtLeastOne = 2
    num_clients: AtLeastOne = 10
    rounds: Annotated[int, Field(ge=1, le=MAX_ROUNDS)] = 10
    local_epochs: AtLeastOne = 1
    batch_size: AtLeastOne = 256
    # the S-Server evaluates one such batch at a time between requests: a request never waits
    # behind more than one
    eval_batch_size: AtLeastOne = 128
    # adamw: decoupled weight decay (LoRA's E2E setup); adam adds the decay to the gradient
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Positive = 1e-3
    weight_decay: NonNegative = 1e-4
    momentum: NonNegative = 0.9  # sgd's
    # the gradient norm of each model clipped to this before a step; 0: off
    grad_clip: NonNegative = 0.0
    # the client and server models' lr per round: constant, or linear warm-up over
    # `warmup_rounds` then linear decay (lr × min(t / warmup_rounds, (rounds − t + 1) /
    # (rounds − warmup_rounds))); the auxiliary models keep aux_lr
    lr_schedule: Literal["constant", "warmup_linear"] = "constant"
    warmup_rounds: Count = 0

    @model_validator(mode="after")
    def _warmup_leaves_a_round(self) -> Config:
        if self.lr_schedule == "warmup_linear" and self.warmup_rounds >= self.rounds:
            why = f"must be < rounds={self.rounds} (the decay needs a round)"
            raise ConfigError("warmup_rounds", f"{why}, got {self.warmup_rounds}")
        return self

    # training losses only (client, server, aux); test_loss stays the plain NLL, so
    # test_perplexity = exp(test_loss)
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    server_update_interval: AtLeastOne = 5  # q
    align_interval: AtLeastOne = 10  # l
    # the first round fsl_sage aligns in, then every l-th: 1 as the reference (its t = 0); l
    # aligns in rounds l, 2l, ... (clients train their first l − 1 rounds on the initial aux)
    first_align_round: AtLeastOne = 1
    align_buffer_size: AtLeastOne = 1000
    align_epochs: AtLeastOne = 100
    align_batch_size: AtLeastOne = 1000
    # the auxiliary models' own optimizer (the reference's: Adam 1e-3, no weight decay), for
    # cse_fsl's client-side steps and fsl_sage's alignment alike
    aux_optimizer: Literal["adam", "sgd"] = "adam"
    aux_lr: Positive = 1e-3
    aux_weight_decay: NonNegative = 0.0
    # fsl_sage's alignment targets ∂L/∂z: the server in train mode (the reference: BN over the
    # buffer, running statistics updated) or eval mode (no side effects)
    align_target_mode: Literal["train", "eval"] = "train"
    align_targets: Literal["lazy", "eager"] = "lazy"
    # stateless (sl, splitfed_v2): replicas answer from published weights, a reducer steps
    server_mode: Literal["stateful", "stateless"] = "stateful"
    server_replicas: AtLeastOne = 2  # runtime ray: replica actors (in-process, one replica serves)
    sync_every: Count = 0  # the reducer steps every this many gradients; 0: once a round
    gradient_store: Literal["object_store", "files"] = "object_store"
    # files: a directory every node sees; "": a temporary one
    gradient_store_path: Annotated[str, AfterValidator(_not_a_file)] = ""
    warm_start: bool = False  # aux algorithms: round 0 is one round of cse_fsl
    # gas (asynchronous): a round is one global iteration
    local_iters: AtLeastOne = 20  # a client's steps before it uploads its model
    model_buffer: AtLeastOne = 10  # uploaded models averaged into one global iteration
    activation_buffer: AtLeastOne = 10  # batches the S-Server collects before its step
    per_label: Count = 0  # real + generated activations per label in a server step; 0: batch_size
    active_clients: Count = 0  # clients training at once; 0: all

    @model_validator(mode="after")
    def _active_among_clients(self) -> Config:
        if self.active_clients > self.num_clients:
            why = f"at most num_clients={self.num_clients} can train at once"
            raise ConfigError("active_clients", f"{why}, got {self.active_clients}")
        return self

    # label-wise Gaussians: full covariance, its diagonal, or auto (diag above 1024 features)
    activation_covariance: Literal["auto", "full", "diag"] = "auto"
    # each activation's weight in them: its client's progress count (the authors' code: newer
    # activations weigh more) or 1 (plain count-weighted moments)
    activation_weighting: Literal["progress", "count"] = "progress"
    server_lr_decay: bool = False  # server lr η₀/√t in global iteration t
    comm_budget_gib: Positive = 200.0
    # client profiles (SPEC §6): a name in fslsage.simulation.PROFILES, or auto (see below)
    network: str = "auto"
    network_args: dict = field(default_factory=dict)
    server_gflops: Positive = 10000.0  # the S-Server's FLOP/s in the simulated clock, in GFLOP/s
    target_acc: Annotated[float, Field(ge=0, le=1)] = 0.8
    seed: Annotated[
        int, Field(ge=0, le=MAX_SEED, description="numpy's legacy seeding takes 2**32 - 1 at most")
    ] = 0
    # torch intra-op threads of every process that computes: the in-process runtime, each
    # client actor, the S-Server and its replicas. One count for both runtimes, because the
    # thread count changes how reductions are summed, so the runtimes agree only with the same
    threads: AtLeastOne = 1
    # on a GPU: deterministic cuDNN/cuBLAS kernels and no TF32 in every process that computes,
    # so the runtimes agree there as they do on the CPU; off: cuDNN picks its fastest kernels
    deterministic: bool = False
    # bf16 autocast of client, aux and server compute and of evaluation (what travels stays
    # float32, as the dry-run plans it); channels_last: convolution weights in NHWC layout
    amp: Literal["off", "bf16"] = "off"
    channels_last: bool = False
    runtime: Literal["local", "ray"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    client_gpus: Annotated[
        float, Field(ge=0, le=1, description="a client actor gets at most 1 GPU")
    ] = 0.0
    server_gpus: NonNegative = 0.0
    client_cpus: Positive = 1.0  # per client actor (runtime: ray)
    num_client_actors: Count = 0  # 0: as many as the cluster's CPUs (and GPUs) hold
    server_accelerator: str = ""  # Ray accelerator type the S-Server asks for, e.g. "A100"
    server_batching: Literal["exact", "coalesce"] = "exact"
    max_batch: AtLeastOne = 8
    max_wait_ms: NonNegative = 5.0
    # the S-Server's per-client state (fsl_sage's aux models, their optimizers and alignment
    # buffers; splitfed_v1's server copies) on its device only while that client is served, on
    # the CPU otherwise: auto = where the S-Server computes on CUDA (not on/off: YAML reads
    # those as booleans)
    offload_client_state: Literal["auto", "always", "never"] = "auto"
    # the whole experiment to <out>/checkpoints/ every this many rounds (a Ray run also keeps
    # one in the object store to recover lost actors); 0: never
    checkpoint_every: Count = 10
    # also after any round that begins this many minutes after the last checkpoint (paper
    # rounds can take minutes each); 0: by rounds only. Needs checkpoint_every > 0
    checkpoint_minutes: NonNegative = 5.0
    # the figures' GiB and simulated-time axes: log where the data spans more than two decades
    plot_x_scale: Literal["auto", "log", "linear"] = "auto"
    # a sweep: SearchOptions, and config keys each with the values its trials take
    search: dict = field(default_factory=dict)

    @model_validator(mode="after")
    def _check_search(self) -> Config:
        """`search` holds SearchOptions and config keys, each mapped to a list (a grid) or
        {sampler: args}. Every value a trial can get passes the checks of its key, set alone."""
        try:
            options = SearchOptions.model_validate(self.search)
        except ValidationError as e:
            raise _first_problem(e, SearchOptions, prefix="search.") from None
        for key, spec in self.search.items():
            where = f"search.{key}"
            if key in SEARCH_OPTIONS:
                continue
            if key not in FIELDS or key == "search":
                searchable = [k for k in FIELDS if k != "search"] + list(SEARCH_OPTIONS)
                raise ConfigError(where, _unknown_key_message(str(key), searchable))
            for value in _sampled(where, key, spec):
                try:
                    dataclasses.replace(self, search={}, **{key: value})
                except ValidationError as e:
                    problem = _first_problem(e, Config)  # or a rule it breaks, on another key
                    message = problem.message if problem.key == key else str(problem)
                    raise ConfigError(where, message) from None
        budget, grace = max_budget_gib(self), options.grace_gib
        if grace is not None and grace >= budget:
            why = f"must be < comm_budget_gib={budget} (ASHA's max_t, the most a trial gets)"
            raise ConfigError("search.grace_gib", f"{why}, got {grace}")
        return self

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
FIELD_TYPES = get_type_hints(Config)  # key → its type, for the sweep's search-space translation


class SearchOptions(BaseModel):
    """The sweep's own options in `search`, beside the keys it varies."""

    model_config = ConfigDict(**_STRICT, extra="ignore")  # the rest of `search`: config keys

    num_samples: AtLeastOne = 1
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: Literal[tuple(SEARCH_METRICS)] = "test_acc"
    mode: Literal["max", "min", None] = None  # None: the metric's (SEARCH_METRICS)
    # asha's: GiB before a first cut, below the largest comm_budget_gib (Config checks). GiB
    # per round differ by orders of magnitude between models: no useful default exists
    grace_gib: Annotated[float | None, Field(gt=0)] = None
    reduction_factor: Annotated[float, Field(gt=1)] = 4.0  # asha's
    max_concurrent: Annotated[int, Field(ge=0, description="0: as resources allow")] = 0
    max_failures: Annotated[int, Field(ge=0, description="retries of a failed trial")] = 0

    @model_validator(mode="after")
    def _asha_options(self) -> SearchOptions:
        if self.scheduler == "asha" and self.grace_gib is None:
            why = "scheduler asha needs grace_gib (GiB before a first cut)"
            raise ConfigError("search.grace_gib", why)
        for key in ("grace_gib", "reduction_factor"):
            if self.scheduler != "asha" and key in self.model_fields_set:
                raise ConfigError(f"search.{key}", "only goes with scheduler: asha")
        return self


SEARCH_OPTIONS = tuple(SearchOptions.model_fields)


def _ordered(bounds: list[float]) -> list[float]:
    if not bounds[0] < bounds[1]:
        raise ValueError("needs low < high")
    return bounds


def _bounds(number: Any) -> TypeAdapter:
    pair = Annotated[list[number], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
    return TypeAdapter(pair, config=_STRICT)


_VALUES = TypeAdapter(Annotated[list, Field(min_length=1)], config=_STRICT)
_DISCRETE = ("grid", "choice")  # the key's own values; the others draw between bounds
SEARCH_SAMPLERS = {  # Tune's samplers: what each takes
    "grid": ("a non-empty list of values", _VALUES),
    "choice": ("a non-empty list of values", _VALUES),
    "uniform": ("[low, high] numbers", _bounds(float)),
    "loguniform": ("[low, high] numbers, 0 < low", _bounds(Positive)),
    "randint": ("[low, high] numbers", _bounds(float)),
}


def _sampled(where: str, key: str, spec: Any) -> list:
    """The values of the key a search entry names (a grid's or choice's, or a range's bounds),
    or a ConfigError on `where` if the entry is not `[values]` or `{sampler: args}`."""
    if isinstance(spec, list):
        sampler, args = "grid", spec
    elif isinstance(spec, dict) and len(spec) == 1:
        ((sampler, args),) = spec.items()
    else:
        raise ConfigError(where, f"expected a list of values or {{sampler: args}}, got {spec!r}")
    if sampler not in SEARCH_SAMPLERS:
        hint = _did_you_mean(sampler, SEARCH_SAMPLERS)
        allowed = ", ".join(SEARCH_SAMPLERS)
        raise ConfigError(where, f"unknown sampler {sampler!r}{hint}; allowed: {allowed}")
    if sampler not in _DISCRETE and FIELD_TYPES[key] not in (int, float):
        raise ConfigError(where, f"{sampler} needs a numeric key (int or float), {key} is not")
    takes, check = SEARCH_SAMPLERS[sampler]
    try:
        check.validate_python(args)
    except ValidationError as e:
        error = e.errors()[0].get("ctx", {}).get("error")  # low >= high
        raise ConfigError(where, f"{sampler} {error or 'takes ' + takes}, got {args!r}") from None
    return args


def search_choices(spec: Any) -> list:
    """The discrete values a search entry can take (a list, {grid: [...]} or {choice: [...]}),
    else [] (a continuous sampler, or no entry)."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        ((sampler, values),) = spec.items()
        if sampler in _DISCRETE and isinstance(values, list):
            return values
    return []


def max_budget_gib(cfg: Config) -> float:
    """The largest communication budget any trial of the sweep can get (ASHA's max_t)."""
    spec = cfg.search.get("comm_budget_gib")
    values = search_choices(spec)
    if isinstance(spec, dict) and not values:  # uniform/loguniform/randint: the upper bound
        values = [next(iter(spec.values()))[1]]
    return float(max([cfg.comm_budget_gib, *values]))


# -------------------------------------------------------- a pydantic problem as a ConfigError
_LIMITS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _shown(value: Any) -> str:
    return f"{value:,}" if type(value) is int else repr(value)


def _limits(info: FieldInfo) -> str:
    """A numeric key's declared limits in words: `>= 1`, `in [0, 1)`; "" for none."""
    bound = {op: getattr(m, op) for m in info.metadata for op in _LIMITS if hasattr(m, op)}
    low = [op for op in ("gt", "ge") if op in bound]
    high = [op for op in ("lt", "le") if op in bound]
    if low and high:
        left, right = "[" if "ge" in bound else "(", "]" if "le" in bound else ")"
        return f"in {left}{_shown(bound[low[0]])}, {_shown(bound[high[0]])}{right}"
    return " and ".join(f"{_LIMITS[op]} {_shown(bound[op])}" for op in low + high)


def _did_you_mean(value: Any, allowed: Any) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key_message(key: str, names: Iterable[str] = FIELDS) -> str:
    names = list(names)
    return f"unknown key{_did_you_mean(key, names)}; allowed: {', '.join(names)}"


def _first_problem(e: ValidationError, model: Any, prefix: str = "") -> ConfigError:
    """The ConfigError of a ValidationError's first problem (an unknown key before the rest: a
    misspelt key likelier explains them), worded from the key's declaration."""
    problem = min(e.errors(), key=lambda p: p["type"] != "unexpected_keyword_argument")
    kind, value, ctx = problem["type"], problem["input"], problem.get("ctx", {})
    error = ctx.get("error")
    if isinstance(error, ConfigError):  # a rule between keys names its own key
        return error
    name = str(problem["loc"][0])
    key = prefix + name
    if kind == "unexpected_keyword_argument":
        return ConfigError(key, _unknown_key_message(name))
    info = model.__pydantic_fields__[name]
    if kind == "literal_error":
        allowed = get_args(info.annotation)
        shown = " | ".join(repr(a) for a in allowed)
        return ConfigError(key, f"got {value!r}{_did_you_mean(value, allowed)}; allowed: {shown}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        why = f" ({info.description})" if info.description else ""
        return ConfigError(key, f"must be {_limits(info)}{why}, got {_shown(value)}")
    if kind == "finite_number":
        return ConfigError(key, f"must be finite, got {value!r}")
    if kind.endswith("_type"):  # int_type, string_type, ...
        expected = kind.removesuffix("_type").replace("string", "str")
        return ConfigError(key, f"expected {expected}, got {type(value).__name__} {value!r}")
    return ConfigError(key, str(error) if error else problem["msg"])


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


def validate(raw: dict[str, Any], check_registries: bool = True) -> Config:
    """Build a Config from a plain dict, or raise ConfigError naming the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("<config>", f"expected a mapping of keys, got {type(raw).__name__}")
    try:
        cfg = Config(**{str(k): v for k, v in raw.items()})  # a YAML key may be a number
    except ValidationError as e:
        raise _first_problem(e, Config) from None
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
