"""A run writes and deletes only inside its own folder: sweeps replace only folders they marked
as theirs, temporary gradient records live in the run's folder and go with it; what the
cluster cannot hold is refused before any actor starts; both runtimes compute with the
config's thread count. (Bad input of every kind: tests/test_bad_input.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DEMO, demo_config
from test_ray_runtime import assert_same_metrics, run_local, run_ray

import fslsage.stateless as stateless
from actors.runtime import RayRuntime
from fslsage.config import ConfigError
from fslsage.experiment import LocalRuntime, prepare
from fslsage.placement import actor_demands, check_fits
from fslsage.run import main as run_main
from fslsage.sweep import SWEEP_MARKER, SWEEP_STATE, is_sweep_folder


# ----------------------------------------------------------------------------- sweep folders
def test_a_sweep_owns_only_folders_it_marked(tmp_path):
    ours = tmp_path / "demo_sweep"
    ours.mkdir()
    (ours / SWEEP_MARKER).write_text("demo_sweep\n")
    assert is_sweep_folder(ours)
    moved = tmp_path / "other"  # a marked folder renamed: not this sweep's any more
    ours.rename(moved)
    assert not is_sweep_folder(moved)
    legacy = tmp_path / "old_sweep"  # a sweep from before markers: its state names it
    legacy.mkdir()
    (legacy / SWEEP_STATE).write_text(json.dumps({"config": {"name": "old_sweep"}}))
    assert is_sweep_folder(legacy)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("work\n")
    (foreign / SWEEP_STATE).write_text("{not json")
    assert not is_sweep_folder(foreign)


# ----------------------------------------------------------------------------- temporary files
STATELESS = ["algorithm=splitfed_v2", "server_mode=stateless", "gradient_store=files",
             "rounds=1", "num_clients=4"]  # fmt: skip


def record_folders(monkeypatch) -> list[Path]:
    """The folders gradient records are written to, from now on."""
    seen: list[Path] = []
    save = stateless.save_record

    def saving(directory, record):
        seen.append(Path(directory))
        return save(directory, record)

    monkeypatch.setattr(stateless, "save_record", saving)
    return seen


def run_argv(out: Path, *pairs: str) -> list[str]:
    return ["--config", str(DEMO), *(a for p in pairs for a in ("--set", p)), "--out", str(out)]


def test_gradient_records_live_in_the_runs_folder_and_go_with_it(tmp_path, monkeypatch):
    seen = record_folders(monkeypatch)
    out = tmp_path / "run"
    assert run_main(run_argv(out, *STATELESS)) == 0
    assert seen and set(seen) == {out.resolve() / "gradients"}
    assert not (out / "gradients").exists()  # applied records deleted, then the folder
    left = list(out.iterdir())  # the run's results only: files, no folder of temporaries
    assert {"metrics.parquet", "partition.csv"} <= {p.name for p in left}
    assert all(p.is_file() for p in left), [p.name for p in left if not p.is_file()]


def test_a_shared_gradient_store_gets_a_folder_per_run_and_keeps_the_rest(tmp_path, monkeypatch):
    seen = record_folders(monkeypatch)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "someone_elses.pt").write_bytes(b"keep me")
    out = tmp_path / "run"
    assert run_main(run_argv(out, *STATELESS, f"gradient_store_path={shared}")) == 0
    (folder,) = set(seen)
    assert folder.parent == shared.resolve() and folder.name.startswith("run-")
    assert not folder.exists()
    assert [p.name for p in shared.iterdir()] == ["someone_elses.pt"]


def test_leftover_records_of_a_killed_run_are_removed_with_the_store(tmp_path):
    files = demo_config(algorithm="splitfed_v2", server_mode="stateless", gradient_store="files")
    cfg = stateless.run_gradient_store(files, tmp_path)
    folder = Path(cfg.gradient_store_path)
    assert folder == tmp_path.resolve() / "gradients"
    folder.mkdir()
    (folder / "a.pt").write_bytes(b"x")
    (folder / "b.tmp").write_bytes(b"x")
    (folder / "notes.txt").write_text("not a record")
    stateless.remove_gradient_store(cfg)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]  # only records are deleted


# ----------------------------------------------------------------------------- resources
def test_check_fits_places_per_node_and_counts_the_whole_cluster():
    nodes = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A100": 1.0}]
    cfg = demo_config(runtime="ray", server_gpus=1.0, client_cpus=1.0,
                      server_accelerator="A100")  # fmt: skip
    # the S-Server (one CPU: it works on a GPU) on the GPU node and 5 clients: 6 of 6 CPUs
    check_fits(actor_demands(cfg, 5), nodes)
    with pytest.raises(ConfigError, match=r"^client_cpus: .*7 CPU in all.*has 6"):
        check_fits(actor_demands(cfg, 6), nodes)
    with pytest.raises(ConfigError, match=r"^client_cpus: one actor asks for 5 CPU"):
        check_fits(actor_demands(cfg.replace(client_cpus=5.0), 1), nodes)
    with pytest.raises(ConfigError, match=r"^server_accelerator: .*H100 accelerator"):
        check_fits(actor_demands(cfg.replace(server_accelerator="H100"), 1), nodes)
    with pytest.raises(ConfigError, match=r"^server_gpus: .*2 GPU"):
        check_fits(actor_demands(cfg.replace(server_gpus=2.0), 1), nodes)
    # two half-GPU clients and the whole-GPU server need 2 GPUs: the cluster has 1
    halves = cfg.replace(client_gpus=0.5)
    with pytest.raises(ConfigError, match=r"^client_gpus: .*GPU in all"):
        check_fits(actor_demands(halves, 2), nodes)


# ----------------------------------------------------------------------------- threads
def test_both_runtimes_compute_with_the_configs_threads_and_determinism(ray_session):
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    cfg = demo_config(threads=2, deterministic=True, rounds=1, num_client_actors=2)
    local = LocalRuntime(prepare(cfg))
    assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    local.close()  # the process's own settings come back
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    runtime = RayRuntime(prepare(cfg))
    try:
        ray = ray_session
        actors = [runtime.server, *runtime.client_actors]
        seen = [ray.get(a.where.remote()) for a in actors]
        assert [(w["threads"], w["deterministic"]) for w in seen] == [(2, True)] * 3
    finally:
        runtime.close()


def test_the_runtimes_agree_over_the_demo_long_enough_to_diverge(ray_session, tmp_path):
    """The demo diverged from round 3 when the in-process runtime took torch's default thread
    count (2 here) and the actors 1: both now take `threads`, whatever this process had."""
    cfg = demo_config(rounds=5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as a fresh process on a 2-core machine starts
    try:
        local = run_local(cfg, tmp_path / "local")
    finally:
        torch.set_num_threads(before)
    ray_df, _ = run_ray(cfg, tmp_path / "ray")
    assert_same_metrics(local, ray_df)
