"""One Tune trial = one experiment: `fslsage.experiment.run_experiment` with a report per round.

Checkpoints every `checkpoint_every` rounds hold the rounds reported so far. A restored trial
(`--resume`, or Tune retrying it) re-runs the experiment from its first round, which is
deterministic for a given seed, and reports only the rounds after its checkpoint, so no round is
reported twice; the sweep's results additionally keep one row per (trial, round) whatever Tune
logged.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from fslsage.experiment import LocalRuntime, Runtime, prepare, run_experiment
from fslsage.stateless import remove_gradient_store, run_gradient_store
from tune.resources import pin_client_actors
from tune.space import trial_config

CHECKPOINT_FILE = "progress.json"


def restored_round() -> int:
    """The last round this trial reported before it was interrupted (-1: a fresh start; round
    0 is a warm start's)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return -1
    with checkpoint.as_directory() as d:
        return int(json.loads((Path(d) / CHECKPOINT_FILE).read_text())["round"])


def make_runtime(prepared: Any) -> Runtime:
    if prepared.cfg.runtime == "ray":
        # Imported here: only ray-runtime trials need the actors (and the trial's placement
        # group, which Tune makes the default for actors started in this process).
        from actors.runtime import RayRuntime

        return RayRuntime(prepared)
    from actors.common import actor_device

    # on CUDA only with the GPU share the trial reserved (tune/resources.py), capped to it
    cfg = prepared.cfg
    return LocalRuntime(prepared, device=actor_device(cfg, cfg.server_gpus, "Tune trial"))


def run_trial(params: dict[str, Any], base: dict[str, Any], cluster: dict[str, float]) -> None:
    """The function trainable; `base` is the sweep's config, `params` this trial's values.
    A diverged loss raises fslsage.experiment.TrainingDiverged: Tune records the trial as
    errored with that message and the other trials go on."""
    import torch

    # one "Checkpoint successfully created" line per round would drown the progress lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = pin_client_actors(trial_config(base, params, check_registries=True), cluster)
    if cfg.runtime == "local":
        torch.set_num_threads(1)  # the trial reserved one CPU
    done = restored_round()
    reported: list[dict[str, Any]] = []

    def on_round(row: dict[str, Any]) -> None:
        reported.append(row)
        if row["round"] <= done:  # reported before the interruption
            return
        if cfg.checkpoint_every and row["round"] % cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as d:
                state = {"round": row["round"], "rows": reported}
                (Path(d) / CHECKPOINT_FILE).write_text(json.dumps(state))
                tune.report(row, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(row)

    # temporary files (the gradient store) stay inside the trial's own folder of the sweep
    cfg = run_gradient_store(cfg, tune.get_context().get_trial_dir())
    runtime = make_runtime(prepare(cfg))
    try:
        run_experiment(cfg, runtime, out_dir=None, progress=None, on_round=on_round)
    finally:
        runtime.close()
        remove_gradient_store(cfg)
