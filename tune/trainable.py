"""One Tune trial = one experiment: `fslsage.experiment.run_experiment` with a report per round.

Whenever the experiment checkpoints (every `checkpoint_every` rounds, or `checkpoint_minutes`
after the last) the trial reports a Tune checkpoint that holds the whole experiment
(`fslsage.checkpoint`: plain data, loaded with weights_only), so a restored trial (`--resume`,
or Tune retrying it: `search.max_failures`) goes on from that round. (A runtime that
could not give its state would re-run from round 1, deterministic for a seed, and report only the
rounds after its checkpoint.) No round is reported twice, and the sweep's results keep one row
per (trial, round) whatever Tune logged.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from fslsage import checkpoint as experiment_checkpoint
from fslsage.experiment import checkpoint_folder, prepare, run_experiment
from fslsage.results import write_partition_csv
from fslsage.run import make_runtime
from fslsage.stateless import remove_gradient_store, run_gradient_store
from tune.resources import pin_client_actors
from tune.space import trial_config

CHECKPOINT_FILE = "progress.json"


def restored_round(folder: Path | None) -> int:
    """The last round this trial reported before it was interrupted (-1: a fresh start; round
    0 is a warm start's). The experiment's checkpoint file in it, if any, goes to `folder`, the
    trial's checkpoint folder, for the experiment to resume from: only Tune's checkpoint counts
    (one written after it, whose round Tune never got, must not be resumed from)."""
    if folder is not None:
        experiment_checkpoint.remove_all(folder)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return -1
    with checkpoint.as_directory() as d:
        saved = [p for p in Path(d).iterdir() if experiment_checkpoint.FILE.match(p.name)]
        if folder is not None and saved:
            folder.mkdir(parents=True, exist_ok=True)
            for path in saved:
                shutil.copy2(path, folder / path.name)
        return int(json.loads((Path(d) / CHECKPOINT_FILE).read_text())["round"])


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
    # temporary files (the gradient store) and checkpoints stay inside the trial's own folder
    trial_dir = Path(tune.get_context().get_trial_dir())
    cfg = run_gradient_store(cfg, trial_dir)
    prepared = prepare(cfg)
    # into the trial's folder of the sweep, where the driver draws it when the sweep ends
    # (get_trial_dir() is a local working folder Tune does not sync, and a reused actor's)
    write_partition_csv(prepared.histogram, tune.get_context().get_storage().trial_fs_path)
    runtime = make_runtime(prepared)
    # the experiment's own files (its checkpoints, which travel in Tune's checkpoints) in a
    # folder of their own, apart from what the sweep writes into the trial's folder
    work_dir = trial_dir / "experiment"
    folder = checkpoint_folder(cfg, runtime, work_dir)  # None: the runtime cannot
    done = restored_round(folder)
    resume = folder is not None and bool(experiment_checkpoint.rounds(folder))

    def on_round(row: dict[str, Any]) -> None:
        t = row["round"]
        if t <= done:  # reported before the interruption (re-run from round 1)
            return
        # a Tune checkpoint wherever the experiment just wrote its own (by rounds or by
        # checkpoint_minutes; restored_round cleared older attempts' files)
        saved = None if folder is None else experiment_checkpoint.path(folder, t)
        if saved is not None and saved.is_file():
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / CHECKPOINT_FILE).write_text(json.dumps({"round": t}))
                shutil.copy2(saved, Path(d) / saved.name)
                tune.report(row, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(row)

    try:
        run_experiment(cfg, runtime, out_dir=None if folder is None else work_dir,
                       progress=None, on_round=on_round, resume=resume)  # fmt: skip
    finally:
        runtime.close()
        remove_gradient_store(cfg)
