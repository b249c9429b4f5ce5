"""`python -m fslsage.run`: the dry-run ledger (table and JSON) against the paper's accounting,
and a real training run on digits writing metrics.parquet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fslsage.run import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PAPER = ROOT / "configs" / "paper" / "cifar10_resnet18.yaml"

# The paper's accounting for ResNet-18 on CIFAR-10 (32×32 inputs, cut after layer2).
CLIENTS = 10
SAMPLES = 5000  # 50,000 CIFAR-10 training images over 10 clients
BATCH = 256  # 5000 = 19 × 256 + 136: 20 local iterations k = 0..19 per round
CUT = 128 * 4 * 4 * 4  # smashed data per sample: 128×4×4 float32 = 8192 B
LABEL = 8  # an int64 label per sample
CLIENT_MODEL = 2_740_048  # conv1, bn1, layer1, layer2: parameters + persistent buffers
AUX_MODEL = 8_419_408  # the auxiliary model sent down at alignment
Q, L = 5, 10  # server_update_interval, align_interval
UPLOADS = [k for k in range(20) if k % Q == 0]  # k = 0, 5, 10, 15: all full batches

MODEL_BOTH_WAYS = {"up": CLIENT_MODEL * CLIENTS, "down": CLIENT_MODEL * CLIENTS}
METRICS = ["round", "test_acc", "test_loss", "train_loss", "comm_gib", "up_gib", "down_gib"]
METRICS += ["sim_time_s", "wall_s"]


@pytest.fixture
def empty_data(tmp_path) -> Path:
    d = tmp_path / "no_data_here"
    d.mkdir()
    return d


def paper(empty_data: Path, *pairs: str) -> list[str]:
    """argv for the paper config with an empty data_dir (a dry run must not need the data)."""
    sets = [a for p in (f"data_dir={empty_data}", *pairs) for a in ("--set", p)]
    return ["--config", str(PAPER), *sets]


def dry_json(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--dry-run", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert len(out.strip().splitlines()) == 1, out  # one JSON object, nothing else
    return json.loads(out)


def test_dry_run_table(capsys, empty_data):
    assert main([*paper(empty_data, "rounds=3"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.strip().splitlines()
    assert lines[0].startswith("fsl_sage on resnet18/cifar10, 10 clients")
    header, rows = lines[1].split(), [line.split() for line in lines[2:]]
    assert header[0] == "round" and "activations" in header and "GiB" in header
    assert [r[0] for r in rows] == ["1", "2", "3"]
    total = 3 * (len(UPLOADS) * BATCH * (CUT + LABEL) + 2 * CLIENT_MODEL) * CLIENTS
    total += AUX_MODEL * CLIENTS  # round 1 aligns
    assert rows[-1][-2] == f"{total / 2**30:.4f}"  # cumulative GiB
    assert lines[1].endswith("sim time (s)")  # SPEC §6: cumulative simulated seconds, rising
    sim = [float(r[-1]) for r in rows]
    assert 0 < sim[0] < sim[1] < sim[2]
    assert list(empty_data.iterdir()) == []  # no data was fetched


def test_dry_run_json_shape(capsys, empty_data):
    d = dry_json(capsys, paper(empty_data, "rounds=3"))
    assert set(d) == {"algorithm", "rounds"}
    assert d["algorithm"] == "fsl_sage"
    assert [r["round"] for r in d["rounds"]] == [1, 2, 3]
    for r in d["rounds"]:
        assert set(r) == {"round", "up_bytes", "down_bytes", "by_kind", "sim_time_s"}
        assert isinstance(r["up_bytes"], int) and isinstance(r["down_bytes"], int)
        assert r["up_bytes"] == sum(v["up"] for v in r["by_kind"].values())
        assert r["down_bytes"] == sum(v["down"] for v in r["by_kind"].values())
    assert list(empty_data.iterdir()) == []


def test_dry_run_fsl_sage_matches_the_paper(capsys, empty_data):
    rounds = dry_json(capsys, paper(empty_data, "rounds=11"))["rounds"]
    assert len(rounds) == 11
    smashed = len(UPLOADS) * BATCH * CLIENTS  # samples whose activations go up per round
    for r in rounds:
        t, kinds = r["round"], r["by_kind"]
        expected = {
            "activations": {"up": smashed * CUT, "down": 0},
            "labels": {"up": smashed * LABEL, "down": 0},
            "client_model": MODEL_BOTH_WAYS,
        }
        if (t - 1) % L == 0:  # alignment: the aligned aux model goes down, rounds 1 and 11
            expected["aux_model"] = {"up": 0, "down": AUX_MODEL * CLIENTS}
        assert kinds == expected, t  # never a gradient, never an aux upload
        assert r["up_bytes"] == smashed * (CUT + LABEL) + CLIENT_MODEL * CLIENTS
        aligned = AUX_MODEL * CLIENTS if t in (1, 11) else 0
        assert r["down_bytes"] == CLIENT_MODEL * CLIENTS + aligned
    assert rounds[0]["up_bytes"] == 4 * 256 * 8192 * 10 + 4 * 256 * 8 * 10 + 2_740_048 * 10
    # the reference aligns in its first round (t = 0) and when t % l == 0: our rounds 1, 11
    assert [r["round"] for r in rounds if "aux_model" in r["by_kind"]] == [1, 11]


def test_dry_run_splitfed_v2_sends_every_batch(capsys, empty_data):
    d = dry_json(capsys, paper(empty_data, "rounds=2", "algorithm=splitfed_v2"))
    assert d["algorithm"] == "splitfed_v2"
    for r in d["rounds"]:
        assert r["by_kind"] == {
            "activations": {"up": SAMPLES * CUT * CLIENTS, "down": 0},
            "gradients": {"up": 0, "down": SAMPLES * CUT * CLIENTS},
            "labels": {"up": SAMPLES * LABEL * CLIENTS, "down": 0},
            "client_model": MODEL_BOTH_WAYS,
        }


def test_dry_run_stops_at_the_budget(capsys, empty_data):
    per_round = len(UPLOADS) * BATCH * (CUT + LABEL) * CLIENTS + 2 * CLIENT_MODEL * CLIENTS
    first = per_round + AUX_MODEL * CLIENTS  # round 1 aligns
    budget = (first + 1.5 * per_round) / 2**30
    d = dry_json(capsys, paper(empty_data, "rounds=50", f"comm_budget_gib={budget}"))
    assert [r["round"] for r in d["rounds"]] == [1, 2, 3]  # the round that crosses it is the last


def test_dry_run_json_subprocess_prints_only_json(tmp_path, empty_data):
    """The real command: stdout is exactly one JSON object (pipeable), stderr is empty."""
    proc = subprocess.run(
        [sys.executable, "-m", "fslsage.run", *paper(empty_data, "rounds=2"), "--dry-run"]
        + ["--json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    d = json.loads(proc.stdout)
    assert d["algorithm"] == "fsl_sage" and len(d["rounds"]) == 2


PROGRESS = re.compile(r"\bround\s+(\d+)/(\d+)\b")


def train(capsys, out_dir: Path, *pairs: str) -> tuple[pd.DataFrame, list[str]]:
    sets = [a for p in pairs for a in ("--set", p)]
    # (tracking: tests/test_run_tracking.py; a store costs seconds to make)
    assert main(["--config", str(DEMO), *sets, "--out", str(out_dir), "--no-mlflow"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return pd.read_parquet(out_dir / "metrics.parquet"), out.splitlines()


def test_training_run_writes_metrics(capsys, tmp_path):
    out_dir = tmp_path / "run"
    df, lines = train(capsys, out_dir, "rounds=2")
    assert list(df.columns) == [*METRICS, "align_loss"]  # fsl_sage adds its alignment loss
    assert df["round"].tolist() == [1, 2]
    progress = [m.groups() for line in lines if (m := PROGRESS.search(line))]
    assert progress == [("1", "2"), ("2", "2")]  # one progress line per round
    assert all("GiB" in line and "test_acc" in line for line in lines if PROGRESS.search(line))
    assert df["test_acc"].between(0, 1).all()
    assert (df["comm_gib"] > 0).all() and df["comm_gib"].is_monotonic_increasing
    assert df["comm_gib"].to_numpy() == pytest.approx((df["up_gib"] + df["down_gib"]).to_numpy())
    assert df["wall_s"].is_monotonic_increasing
    # the demo's align_interval 2 from first_align_round 2: aligned in round 2 (4, ...), not 1
    assert df["align_loss"].notna().tolist() == [False, True]
    assert (out_dir / "partition.csv").is_file()
    # the simulated clock of the run (its ledger) is the one the dry-run plans
    planned = dry_json(capsys, ["--config", str(DEMO), "--set", "rounds=2"])["rounds"]
    assert df["sim_time_s"].tolist() == pytest.approx([r["sim_time_s"] for r in planned])
    assert 0 < df["sim_time_s"].iloc[0] < df["sim_time_s"].iloc[1]


def test_training_run_without_alignment_has_no_align_loss(capsys, tmp_path):
    df, lines = train(capsys, tmp_path / "run", "rounds=1", "algorithm=splitfed_v1")
    assert list(df.columns) == METRICS
    assert len(df) == 1
    assert sum(bool(PROGRESS.search(line)) for line in lines) == 1


def test_dry_run_of_the_gas_paper_config(capsys, empty_data):
    """The GAS setup plans its schedule without data: per global iteration, ten model uploads
    and one activation batch up and a gradient down per step, on wireless clients."""
    argv = ["--config", str(PAPER.parent / "cifar10_gas.yaml"), "--set", f"data_dir={empty_data}",
            "--set", "rounds=3"]  # fmt: skip
    rounds = dry_json(capsys, argv)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    model = rounds[1]["by_kind"]["client_model"]["up"]
    assert all(r["by_kind"]["client_model"]["up"] == model for r in rounds) and model > 0
    for r in rounds:
        kinds = r["by_kind"]
        assert kinds["activations"]["up"] == kinds["gradients"]["down"] > 0
        assert kinds["labels"]["up"] * 64 * 8 * 8 * 4 == kinds["activations"]["up"] * 8
    assert 0 < rounds[0]["sim_time_s"] < rounds[1]["sim_time_s"] < rounds[2]["sim_time_s"]
    assert list(empty_data.iterdir()) == []
