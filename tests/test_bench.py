"""The benchmark scripts run end to end and print their figures (tiny settings; the figures
themselves are measured with `make bench`, never asserted here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()


def test_overhead_bench_prints_the_steady_state_and_the_whole_run_ratio():
    lines = run_bench("bench/overhead.py", "--rounds", "4", "--repeats", "1", "--chunk", "1")
    steady = re.fullmatch(r"steady state \(rounds 3–4, after the warm-up\): paired ratios "
                          r".*; ray/local (\d+\.\d\d)", lines[-2])  # fmt: skip
    figure = re.fullmatch(r"ray/local throughput ratio: (\d+\.\d\d)", lines[-1])
    assert steady and figure, lines[-3:]
    assert float(steady[1]) > 0 and float(figure[1]) > 0
    paired = [line for line in lines if line.startswith("local, ")]
    assert paired and all("paired ratios" in line for line in paired), lines


def test_server_batching_bench_prints_its_ratio():
    lines = run_bench("bench/server_batching.py", "--clients", "4", "--requests", "5")
    assert re.fullmatch(r"coalesce/exact requests/s: \d+\.\d\d", lines[-1]), lines[-3:]
