"""The config's `search` block as a Ray Tune search space, and a trial's full config from it.

Only the searched keys go into Tune's `param_space` (so trial names, `params.json` and the
ResultGrid show what varies); the rest of the config travels with the trainable and is merged
back per trial by `trial_config`, which re-validates exactly as `fslsage.run` would.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from fslsage.config import (
    FIELD_TYPES,
    SEARCH_METRICS,
    SEARCH_OPTIONS,
    Config,
    ConfigError,
    max_budget_gib,
    validate,
)


def searched_keys(search: dict[str, Any]) -> list[str]:
    """Config keys the sweep varies, in the order the search block lists them."""
    return [k for k in search if k not in SEARCH_OPTIONS]


def _domain(spec: Any) -> Any:
    if isinstance(spec, list):
        return tune.grid_search(spec)
    ((sampler, args),) = spec.items()
    if sampler == "grid":
        return tune.grid_search(args)
    if sampler == "choice":
        return tune.choice(args)
    low, high = args
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[
        sampler
    ](low, high)


def param_space(search: dict[str, Any]) -> dict[str, Any]:
    """{key: list | {sampler: args}} → Tune domains; `randint` is [low, high) as in Ray."""
    return {key: _domain(search[key]) for key in searched_keys(search)}


def trial_config(
    base: dict[str, Any], params: dict[str, Any], check_registries: bool = False
) -> Config:
    """The validated config of one trial: the base config with the trial's sampled values and
    no search block (a trial is a single experiment). Samplers give floats for int keys (e.g.
    `uniform` over `rounds`); those are rounded here rather than rejected."""
    raw = {**base, "search": {}}
    if "network" not in params:  # `auto`: the one network of the whole sweep
        raw["network"] = validate(base, check_registries=False).network_profile
    for key, value in params.items():
        if FIELD_TYPES.get(key) is int and isinstance(value, float):
            value = int(round(value))
        raw[key] = value
    return validate(raw, check_registries=check_registries)


def trial_count(search: dict[str, Any]) -> int:
    """How many trials the sweep makes: Tune draws num_samples of every grid combination."""
    count = search.get("num_samples", 1)
    for key in searched_keys(search):
        spec = search[key]
        if isinstance(spec, list) or "grid" in spec:
            count *= len(spec if isinstance(spec, list) else spec["grid"])
    return count


def options(search: dict[str, Any]) -> dict[str, Any]:
    """The sweep options with their defaults (validated by fslsage.config already)."""
    metric = search.get("metric", "test_acc")
    return {
        "num_samples": search.get("num_samples", 1),
        "max_concurrent": search.get("max_concurrent", 0),
        # a failed trial is tried again this many times, from its last checkpoint
        "max_failures": search.get("max_failures", 0),
        "scheduler": search.get("scheduler", "fifo"),
        "metric": metric,
        "mode": search.get("mode", SEARCH_METRICS[metric]),
        "grace_gib": search.get("grace_gib"),
        "reduction_factor": search.get("reduction_factor", 4),
    }


def scheduler(cfg: Config) -> Any:
    """None (FIFO) or ASHA cutting trials at equal communication: time_attr is comm_gib, so a
    rung is a number of GiB spent, not a number of rounds."""
    opts = options(cfg.search)
    if opts["scheduler"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    if opts["grace_gib"] is None:  # validate() guarantees it; kept for direct callers
        raise ConfigError("search.grace_gib", "scheduler asha needs grace_gib")
    return ASHAScheduler(
        time_attr="comm_gib",
        max_t=max_budget_gib(cfg),
        grace_period=float(opts["grace_gib"]),
        reduction_factor=float(opts["reduction_factor"]),
    )


def trial_label(params: dict[str, Any], keys: list[str]) -> str:
    """`alpha=0.1 lr=0.001`: the searched values except the algorithm (shown on its own)."""
    parts = []
    for key in keys:
        if key == "algorithm" or key not in params:
            continue
        value = params[key]
        parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
