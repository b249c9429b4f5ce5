"""The GPU machine check: one command for the day a GPU machine is lent; prints ONE JSON object
on its last line.

Parts (each in its own try/except: a failure is recorded as {"ok": false, "error": ...} and the
rest still run):

* environment: GPU name and memory, torch / CUDA / cuDNN / Python / Ray versions and
  `ray.cluster_resources()`;
* fractional_gpu: 3 rounds of fsl_sage on synthetic CIFAR-10 shapes on Ray with
  `server_gpus: 0.5`, `client_gpus: 0.25`: each actor's `where()` and the run's metrics, with
  the per-round peak GPU memory of the S-Server and of the client actors (`peak_gpu_mib_server`,
  `peak_gpu_mib_clients`, MiB; `peak_gpu_mib`: each one's largest over the rounds; none with
  --cpu) — the S-Server keeps one client's aux state on the card (`offload_client_state: auto`);
* recovery: the same config with a checkpoint every 2 rounds, a client actor armed to die in
  round 2: the run finishes, the actor came back in a new process, and the metrics equal an
  uninterrupted in-process run's to 1e-6;
* parity: in-process against Ray, exact batching (`deterministic: true` on a GPU): the
  metrics equal to 1e-6 (fsl_sage: against the fractional_gpu run; splitfed_v2: a run of its
  own, except with --cpu);
* paper_round: bench/paper_round.py's figures (full sizes on a GPU, unless --shrunk; shrunken,
  fsl_sage only, with --cpu);
* paper_round_bf16: the same for fsl_sage with `amp: bf16` and `channels_last: true`.

`--cpu` runs all of it without CUDA (no GPU shares, device cpu). Runs in a few minutes on one
GPU (the 8 minutes it may take at most are mostly the full-size benchmark).

    .venv/bin/python bench/gpu_check.py [--cpu] [--shrunk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, ROOT)

from bench.paper_round import paper_config, run_paper_round  # noqa: E402
from fslsage.config import Config  # noqa: E402
from fslsage.experiment import LocalRuntime, prepare, run_experiment  # noqa: E402
from fslsage.memory import PEAK_GPU_MIB  # noqa: E402

METRICS = ["test_acc", "test_loss", "comm_gib", "sim_time_s"]  # as tests/test_ray_runtime.py
TOLERANCE = 1e-6
TINY = ["dataset_args.num_train=160", "dataset_args.num_test=32", "batch_size=32",
        "eval_batch_size=32", "num_clients=4", "align_epochs=2", "align_buffer_size=32",
        "align_batch_size=32", "rounds=3", "server_batching=exact"]  # fmt: skip


def tiny_config(cpu: bool, **changes: Any) -> Config:
    """fsl_sage on synthetic CIFAR-10 shapes, tiny; on a GPU: 0.5 GPU for the S-Server, 0.25 per
    client actor, deterministic kernels (so that the runtimes agree)."""
    cfg = paper_config(False, TINY)
    if cpu:
        gpu = {"device": "cpu", "server_gpus": 0.0, "client_gpus": 0.0}
    else:
        gpu = {"device": "cuda", "server_gpus": 0.5, "client_gpus": 0.25, "deterministic": True}
    return cfg.replace(**{"algorithm": "fsl_sage", **gpu, **changes})


def run_local(cfg: Config) -> list[dict[str, float]]:
    runtime = LocalRuntime(prepare(cfg))
    try:
        df = run_experiment(cfg, runtime, progress=None)
    finally:
        runtime.close()
    return df.to_dict("records")


def run_ray(cfg: Config, before: Callable[[Any], Any] | None = None) -> tuple[list, Any]:
    """The run's metrics rows and what `before(runtime)` returned (called before round 1)."""
    from actors.runtime import RayRuntime

    runtime = RayRuntime(prepare(cfg))
    try:
        info = before(runtime) if before is not None else None
        df = run_experiment(cfg, runtime, progress=None)
    finally:
        runtime.close()
    return df.to_dict("records"), info


def metric_diff(a: list[dict], b: list[dict]) -> float:
    """The largest difference of the compared metrics; inf where the rounds differ."""
    if [r["round"] for r in a] != [r["round"] for r in b]:
        return float("inf")
    return max(abs(float(x[c]) - float(y[c])) for x, y in zip(a, b, strict=True) for c in METRICS)


def brief(rows: list[dict]) -> list[dict]:
    """The compared metrics of each round, and its peak GPU memory columns where there are
    (`peak_gpu_mib_server`, `_clients`, …: on CUDA only)."""
    peaks = sorted({k for r in rows for k in r if k.startswith(PEAK_GPU_MIB)})
    keep = ["round", "train_loss", *METRICS, *peaks]
    return [{k: float(r[k]) if k != "round" else int(r[k]) for k in keep if k in r} for r in rows]


def peak_gpu(rows: list[dict]) -> dict[str, float]:
    """Each actor kind's largest peak GPU memory over the run's rounds, in MiB (none on CPU)."""
    peaks = {k for r in rows for k in r if k.startswith(PEAK_GPU_MIB)}
    return {k: max(float(r[k]) for r in rows if k in r and r[k] == r[k]) for k in sorted(peaks)}


def environment(cpu: bool) -> dict[str, Any]:
    import ray

    cuda = torch.cuda.is_available() and not cpu
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "ray": ray.__version__,
        "cluster_resources": ray.cluster_resources(),
        "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["gpu_memory_gib"] = props.total_memory / 2**30
    return env


def fractional_gpu(cpu: bool, shared: dict[str, Any]) -> dict[str, Any]:
    cfg = tiny_config(cpu)
    start = time.perf_counter()
    rows, placement = run_ray(cfg, lambda runtime: runtime.placement())
    shared["fsl_sage_ray"] = rows
    return {"wall_s": time.perf_counter() - start, "placement": placement,
            "server_gpus": cfg.server_gpus, "client_gpus": cfg.client_gpus,
            "offload_client_state": cfg.offload_client_state, "peak_gpu_mib": peak_gpu(rows),
            "metrics": brief(rows)}  # fmt: skip


def recovery(cpu: bool) -> dict[str, Any]:
    import ray

    cfg = tiny_config(cpu, checkpoint_every=2)
    pids: dict[str, Any] = {}

    def arm(runtime) -> None:
        actor = runtime.client_actors[0]
        owned = runtime.owned[0]
        pids["before"] = ray.get(actor.where.remote())["pid"]
        pids["actor"] = actor
        # the first actor's second client (its first where it owns one): it dies mid-round 2
        ray.get(actor.arm_crash.remote(2, owned[1] if len(owned) > 1 else owned[0]))

    from actors.runtime import RayRuntime
    from tests.crashes import CRASHING  # the test suite's fault injection

    runtime = RayRuntime(prepare(cfg), actor_classes=CRASHING)
    try:
        arm(runtime)
        ray_rows = run_experiment(cfg, runtime, progress=None).to_dict("records")
        pids["after"] = ray.get(pids["actor"].where.remote())["pid"]
    finally:
        runtime.close()
    local_rows = run_local(cfg)
    diff = metric_diff(local_rows, ray_rows)
    restarted = pids["after"] != pids["before"]
    ok = restarted and diff <= TOLERANCE
    return {"ok": ok, "restarted": restarted, "pid_before": pids["before"],
            "pid_after": pids["after"], "max_metric_diff": diff,
            "rounds": [int(r["round"]) for r in ray_rows]}  # fmt: skip


def parity(cpu: bool, shared: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"deterministic": not cpu}
    algorithms = ["fsl_sage"] if cpu else ["fsl_sage", "splitfed_v2"]
    ok = True
    for algorithm in algorithms:
        cfg = tiny_config(cpu, algorithm=algorithm)
        ray_rows = shared.get(f"{algorithm}_ray")
        if ray_rows is None:
            ray_rows, _ = run_ray(cfg)
        diff = metric_diff(run_local(cfg), ray_rows)
        out[algorithm] = {"max_metric_diff": diff, "equal": diff <= TOLERANCE}
        ok = ok and diff <= TOLERANCE
    out["ok"] = ok
    return out


SKIPPED: set[str] = set()  # --skip
FAST = ("amp=bf16", "channels_last=true")  # issue 19.2: what a GPU run would turn on


def paper_round(cpu: bool, shrunk: bool, fast: bool = False) -> dict[str, Any]:
    """The benchmark in float32 (all its algorithms), or with `fast` in bf16 autocast and
    channels-last (fsl_sage only: the time left for it)."""
    settings = list(FAST) if fast else []
    if cpu:
        tiny = ["device=cpu", "dataset_args.num_train=80", "dataset_args.num_test=16",
                "num_clients=4", "align_buffer_size=16", "align_batch_size=16"]  # fmt: skip
        return run_paper_round(False, tiny + settings, rounds=2, algorithms=("fsl_sage",))
    algorithms = ("fsl_sage",) if fast else ("fsl_sage", "splitfed_v2")
    return run_paper_round(not shrunk, ["device=cuda", *settings], rounds=2,
                           algorithms=algorithms)  # fmt: skip


def part(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Runs one part; its dict (ok true unless it says otherwise) or its error goes in `report`;
    a part named in --skip is recorded as skipped."""
    if name in SKIPPED:
        report[name] = {"skipped": True}
        return
    start = time.perf_counter()
    try:
        result = fn()
        report[name] = {"ok": True, **result}
    except Exception as e:  # noqa: BLE001 (recorded, and the other parts still run)
        tail = traceback.format_exc().strip().splitlines()[-6:]
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tail}
    report[name]["seconds"] = time.perf_counter() - start
    status = "ok" if report[name]["ok"] else f"FAILED ({report[name].get('error', 'see JSON')})"
    print(f"{name}: {status} in {report[name]['seconds']:.1f} s", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="no CUDA: GPU shares 0, device cpu")
    p.add_argument("--shrunk", action="store_true", help="the shrunken benchmark on a GPU too")
    p.add_argument("--skip", default="", help="comma-separated parts not to run (e.g. to rerun "
                   "only those that failed)")  # fmt: skip
    args = p.parse_args()
    SKIPPED.update(s.strip() for s in args.skip.split(",") if s.strip())
    import ray

    from actors.common import start_local_ray

    report: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu"}
    shared: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        gpus = {"num_gpus": 0} if args.cpu else {}
        start_local_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                        **gpus)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        report["ray_start"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    else:
        try:
            if not args.cpu and not torch.cuda.is_available():
                report["cuda"] = {"ok": False, "error": "CUDA is not available (use --cpu)"}
            part(report, "environment", lambda: environment(args.cpu))
            part(report, "fractional_gpu", lambda: fractional_gpu(args.cpu, shared))
            part(report, "recovery", lambda: recovery(args.cpu))
            part(report, "parity", lambda: parity(args.cpu, shared))
            part(report, "paper_round", lambda: paper_round(args.cpu, args.shrunk))
            part(report, "paper_round_bf16", lambda: paper_round(args.cpu, args.shrunk, True))
        finally:
            ray.shutdown()
    report["seconds"] = time.perf_counter() - started
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
