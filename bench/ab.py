"""Alternating A/B runs of a benchmark script on two revisions of this repository: the trees
take turns (A, B, A, B, ...), so a shared host's changing load falls on both alike, and each
run's figure (the number its last line ends with) is printed, then each tree's median.

    .venv/bin/python bench/ab.py REV_A REV_B [--runs N] -- SCRIPT [ARGS ...]
    .venv/bin/python bench/ab.py HEAD~1 . --runs 5 -- bench/overhead.py --repeats 1

A revision is checked out into a temporary worktree; `.` is this working tree as it is. Each
run starts in its tree with that tree first on PYTHONPATH: Ray's workers import the code of the
directory the driver starts in, so a run started elsewhere would mix the two trees' code.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"(-?\d+(?:\.\d+)?)\s*$")


def figure(output: str) -> float:
    """The number the output's last non-empty line ends with."""
    lines = [line for line in output.splitlines() if line.strip()]
    match = FIGURE.search(lines[-1]) if lines else None
    if match is None:
        raise ValueError(f"no figure at the end of the output:\n{output[-2000:]}")
    return float(match.group(1))


def run(tree: Path, command: list[str]) -> float:
    path = os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, *command], cwd=tree, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{command} failed in {tree} (exit {done.returncode}):\n"
                         f"{done.stdout[-2000:]}{done.stderr[-3000:]}")  # fmt: skip
    return figure(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--runs", type=int, default=5, help="runs of each tree")
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        p.error("no benchmark script given (after --)")
    split = argv.index("--")
    args, command = p.parse_args(argv[:split]), argv[split + 1 :]
    revs = {"A": args.a, "B": args.b}
    with tempfile.TemporaryDirectory(prefix="fslsage-ab-") as tmp:
        trees: dict[str, Path] = {}
        try:
            for label, rev in revs.items():
                if rev == ".":
                    trees[label] = ROOT
                    continue
                tree = Path(tmp) / label
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f",
                                str(tree), rev], check=True, capture_output=True)  # fmt: skip
                trees[label] = tree
            figures: dict[str, list[float]] = {label: [] for label in trees}
            for i in range(args.runs):
                for label, tree in trees.items():
                    figures[label].append(run(tree, command))
                    print(f"run {i + 1}, {label} ({revs[label]}): {figures[label][-1]:g}",
                          flush=True)  # fmt: skip
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], capture_output=True)  # fmt: skip
    for label, rev in revs.items():
        runs = " ".join(f"{x:g}" for x in figures[label])
        print(f"{label} ({rev}): {runs}; median {statistics.median(figures[label]):g}")
    ratio = statistics.median(figures["B"]) / statistics.median(figures["A"])
    print(f"median B / median A: {ratio:.3f}")


if __name__ == "__main__":
    main()
