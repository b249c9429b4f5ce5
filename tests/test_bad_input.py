"""Bad input, tried as a careless or hostile user would: every case ends, through the real CLI
(`python -m fslsage.run` or `python -m fslsage.sweep`), in one stderr line
`fslsage: config error: KEY: ...` naming the key or file (exit code 2, no traceback), quickly (no
hang), and nothing written anywhere: not the output folder, not the results folder, not the
working directory."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_data import write_cifar10

from fslsage import run, sweep

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PAPER = ROOT / "configs" / "paper" / "cifar10_resnet18.yaml"
MISSING = "<missing>"  # --config names a file that does not exist
FOLDER = "<folder>"  # --config names a folder
TINY_CIFAR = """dataset: cifar10
model: simple_conv
data_dir: "{tmp}/data"
download: false
num_clients: {clients}
rounds: 1
"""


@dataclasses.dataclass(frozen=True)
class Bad:
    """A bad command: `args` after `--config FILE` (FILE is `file`, text or bytes written to a
    temp file, MISSING, FOLDER, or the demo config; `{tmp}` stands for the test's folder), the
    key the error must name and fragments it must hold. `setup` makes what the case needs
    beforehand (it is not checked as written by the command), `env` sets variables, `ray` runs
    it in this process's shared Ray instance."""

    args: tuple[str, ...]
    key: str
    says: tuple[str, ...]
    file: str | bytes | None = None
    dry_run: bool = False
    cli: str = "run"
    env: tuple[tuple[str, str], ...] = ()
    setup: Callable[[Path], None] | None = None
    ray: bool = False


def sets(*pairs: str) -> tuple[str, ...]:
    return tuple(a for p in pairs for a in ("--set", p))


def make_file(tmp: Path) -> None:
    (tmp / "afile").write_text("not a folder\n")


def foreign_folder(tmp: Path) -> None:
    """A results folder of the sweep's name that holds someone's data, not a sweep's."""
    (tmp / "results" / "theirs").mkdir(parents=True)
    (tmp / "results" / "theirs" / "thesis.tex").write_text("years of work\n")


def broken_sweep(tmp: Path) -> None:
    folder = tmp / "results" / "broken"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")
    (folder / "sweep.json").write_text('{"config": {"na')  # cut off by a full disk


def tiny_cifar(tmp: Path) -> None:
    write_cifar10(tmp / "data")  # 20 training images in the real format


ALGOS = "allowed: cse_fsl, fedavg, fsl_sage, gas, sl, splitfed_v1, splitfed_v2"
BAD = {
    # unknown and misspelt keys: did-you-mean plus the list of keys
    "unknown key": Bad(sets("bogus_key=1"), "bogus_key", ("unknown key", "allowed: name,")),
    "misspelt key": Bad(
        sets("algoritm=fsl_sage"), "algoritm", ("did you mean 'algorithm'?", "allowed: name,")
    ),
    "misspelt key in file": Bad(
        (), "num_client", ("did you mean 'num_clients'?",), file="num_client: 4\n"
    ),
    # wrong types
    "string for rounds": Bad(sets("rounds=ten"), "rounds", ("expected int", "got str 'ten'")),
    "float for batch_size": Bad(sets("batch_size=3.5"), "batch_size", ("expected int", "3.5")),
    "bool for lr": Bad(sets("lr=true"), "lr", ("expected float", "got bool")),
    "list for alpha": Bad(sets("alpha=[0.1, 1]"), "alpha", ("expected float", "got list")),
    "bool for rounds": Bad(sets("rounds=yes"), "rounds", ("expected int", "got bool")),
    "nan lr": Bad(sets("lr=.nan"), "lr", ("must be finite",)),
    "scalar for a block": Bad(sets("model_args=5"), "model_args", ("expected dict",)),
    "dotted key into a scalar": Bad(sets("rounds.x=1"), "rounds", ("expected int", "got dict")),
    # out of range
    "alpha 0": Bad(sets("alpha=0"), "alpha", ("must be > 0",)),
    "negative lr": Bad(sets("lr=-1e-3"), "lr", ("must be > 0", "-0.001")),
    "rounds 0": Bad(sets("rounds=0"), "rounds", ("must be in [1, 100,000]", "got 0")),
    "client_gpus 2": Bad(sets("client_gpus=2"), "client_gpus", ("at most 1 GPU",)),
    "target_acc 1.5": Bad(sets("target_acc=1.5"), "target_acc", ("must be in [0, 1]", "1.5")),
    "more clients than samples": Bad(
        sets("num_clients=5000"), "num_clients", ("5000 clients", "digits has 1437 samples")
    ),
    "empty name": Bad(sets("name="), "name", ("plain folder name",)),
    "resume without a checkpoint": Bad(
        ("--out", "{tmp}/never", "--resume"), "--resume", ("no checkpoint in", "never")
    ),
    "resume with a dry run": Bad(("--dry-run", "--resume"), "--resume", ("--dry-run",)),
    "max_failures negative": Bad(
        sets("search.max_failures=-1"), "search.max_failures", ("must be >= 0",), cli="sweep"
    ),
    "label_smoothing 1": Bad(sets("label_smoothing=1"), "label_smoothing", ("[0, 1)",)),
    "warm-up as long as the run": Bad(
        sets("lr_schedule=warmup_linear", "warmup_rounds=10", "rounds=10"),
        "warmup_rounds",
        ("must be < rounds=10",),
    ),
    "lr schedule for gas": Bad(
        sets("lr_schedule=warmup_linear", "algorithm=gas"),
        "lr_schedule",
        ("synchronous rounds", "gas cannot"),
    ),
    "perplexity of a classifier": Bad(
        sets("search.metric=test_perplexity"), "search.metric", ("digits has classes",)
    ),
    "adamw misspelt": Bad(sets("optimizer=adamww"), "optimizer", ("did you mean 'adamw'?",)),
    # unknown registry names: did-you-mean plus the list of names
    "unknown algorithm": Bad(
        sets("algorithm=fsl_sag"), "algorithm", ("did you mean 'fsl_sage'?", ALGOS)
    ),
    "unknown model": Bad(
        sets("model=resnet"), "model", ("did you mean 'resnet18'?", "allowed: alexnet_gas,")
    ),
    "unknown dataset": Bad(
        sets("dataset=cifar"), "dataset", ("did you mean 'cifar10'?", "allowed: cifar10,")
    ),
    "unknown partition": Bad(
        sets("partition=dirichlett"), "partition", ("did you mean 'dirichlet'?", "allowed:")
    ),
    # Literal keys
    "align_targets sometimes": Bad(
        sets("align_targets=sometimes"), "align_targets", ("'sometimes'", "'lazy' | 'eager'")
    ),
    "server_batching misspelt": Bad(
        sets("server_batching=coalese"),
        "server_batching",
        ("did you mean 'coalesce'?", "'exact' | 'coalesce'"),
    ),
    "runtime": Bad(sets("runtime=slurm"), "runtime", ("'local' | 'ray'",)),
    # builder arguments
    "unknown model_arg": Bad(
        sets("model_args.nope=1"), "model_args", ("unknown model_arg 'nope'", "allowed: none")
    ),
    "misspelt model_arg": Bad(
        sets("model_args.aux_varient=x"),
        "model_args",
        ("did you mean 'aux_variant'?", "allowed: aux_variant"),
        file=PAPER.read_text(),
    ),
    "bad model_arg value": Bad(
        sets("model_args.aux_variant=huge"),
        "model_args",
        ("aux_variant 'huge'", "allowed:"),
        file=PAPER.read_text(),
    ),
    "unknown dataset_arg": Bad(sets("dataset_args.foo=1"), "dataset_args", ("foo",)),
    "bad dataset_arg value": Bad(
        sets("dataset=e2e", "model=gpt2", "dataset_args.seq_len=1"),
        "dataset_args",
        ("seq_len must be >= 2",),
    ),
    # model and dataset that do not fit
    "gpt2 on digits": Bad(
        sets("model=gpt2"), "model", ("cannot be used with dataset 'digits'", "language-model")
    ),
    "resnet18 on e2e": Bad(
        sets("model=resnet18", "dataset=e2e"),
        "model",
        ("'resnet18' cannot be used with dataset 'e2e'", "classification"),
    ),
    # search blocks
    "unknown key in search": Bad(
        sets("search.bogus=[1]"), "search.bogus", ("unknown key", "num_samples")
    ),
    "misspelt key in search": Bad(
        sets("search.algoritm=[sl]"), "search.algoritm", ("did you mean 'algorithm'?",)
    ),
    "search value not a list": Bad(
        sets("search.alpha=3"), "search.alpha", ("expected a list of values or {sampler: args}",)
    ),
    "unknown sampler": Bad(
        sets("search.lr={normal: [1, 2]}"),
        "search.lr",
        ("unknown sampler 'normal'", "allowed: grid, choice, uniform, loguniform, randint"),
    ),
    "uniform high < low": Bad(
        sets("search.lr={uniform: [5, 1]}"), "search.lr", ("low < high", "[5, 1]")
    ),
    "uniform bounds not numbers": Bad(
        sets("search.lr={uniform: [a, 1]}"), "search.lr", ("[low, high] numbers",)
    ),
    "loguniform from 0": Bad(sets("search.lr={loguniform: [0, 1]}"), "search.lr", ("0 < low",)),
    "search value of the wrong type": Bad(
        sets("search.rounds=[1, two]"), "search.rounds", ("expected int", "'two'")
    ),
    "search value out of range": Bad(sets("search.alpha=[0, 1]"), "search.alpha", ("must be > 0",)),
    "unknown algorithm in search": Bad(
        sets("search.algorithm=[fsl_sage, splitfed]"),
        "search.algorithm",
        ("unknown algorithm 'splitfed'", "did you mean", ALGOS),
    ),
    "unknown key in the file's search block": Bad(
        (), "search.alpah", ("did you mean 'alpha'?",), file="search:\n  alpah: [0.1, 1.0]\n"
    ),
    # the command line and the file itself
    "--set without =": Bad(sets("rounds"), "rounds", ("key=value",)),
    "--set value not YAML": Bad(sets("rounds=[1"), "rounds", ("not valid YAML", "column")),
    "invalid YAML file": Bad(
        (), "--config", ("not valid YAML", "line 2"), file="rounds: [1\nalpha: 2\n"
    ),
    "YAML file not a mapping": Bad((), "--config", ("mapping",), file="- rounds\n- alpha\n"),
    "missing config file": Bad((), "--config", ("no such file", "missing.yaml"), file=MISSING),
    "--json without --dry-run": Bad(("--json", *sets("rounds=1")), "--json", ("--dry-run",)),
    # -- safety: names that reach outside the results folder, paths that cannot be folders
    "name ..": Bad(sets("name=.."), "name", ("plain folder name", "'..'")),
    "name .": Bad(sets("name=."), "name", ("plain folder name", "'.'")),
    "name ../x": Bad(sets("name=../x"), "name", ("plain folder name",)),
    "name with a backslash": Bad(sets("name=a\\b"), "name", ("plain folder name",)),
    "name of 300 characters": Bad(sets("name=" + "n" * 300), "name", ("300 characters",)),
    "name with NUL": Bad((), "name", ("plain folder name",), file='name: "a\\0b"\n'),
    "sweep named ..": Bad(sets("name=.."), "name", ("plain folder name",), cli="sweep"),
    "--out under a file": Bad(
        ("--out", "{tmp}/afile/out"), "--out", ("afile is a file",), setup=make_file
    ),  # fmt: skip
    "--out an existing file": Bad(
        ("--out", "{tmp}/afile"), "--out", ("is not a folder",), setup=make_file
    ),  # fmt: skip
    "--out on /proc": Bad(("--out", "/proc/fslsage-out"), "--out", ("/proc/fslsage-out",)),
    "gradient_store_path a file": Bad(
        sets(
            "algorithm=splitfed_v2",
            "server_mode=stateless",
            "gradient_store=files",
            "gradient_store_path={tmp}/afile",
        ),
        "gradient_store_path",
        ("not a directory",),
        setup=make_file,
    ),  # fmt: skip
    "--results-dir under a file": Bad(
        ("--results-dir", "{tmp}/afile/results"),
        "--results-dir",
        ("afile is a file",),
        cli="sweep",
        setup=make_file,
    ),  # fmt: skip
    "sweep folder of someone else": Bad(
        sets("name=theirs"),
        "name",
        ("no sweep of this name made",),
        cli="sweep",
        setup=foreign_folder,
    ),  # fmt: skip
    "--resume of a broken sweep.json": Bad(
        ("--resume", *sets("name=broken")),
        "--resume",
        ("unreadable",),
        cli="sweep",
        setup=broken_sweep,
    ),  # fmt: skip
    # -- the config file itself
    "binary config file": Bad((), "--config", ("not a text",), file=bytes(range(256))),
    "config file with NUL": Bad((), "--config", ("not a text",), file="rounds: 1\x00\n"),
    "directory as config": Bad((), "--config", ("is a directory",), file=FOLDER),
    "duplicated key in the file": Bad(
        (),
        "--config",
        ("duplicate key 'rounds'", "line 3"),
        file="rounds: 2\nalpha: 1.0\nrounds: 3\n",
    ),
    # -- values the checks used to miss (tracebacks, the wrong key, hangs)
    "huge seed": Bad(sets("seed=99999999999999999999"), "seed", ("2**32 - 1",)),
    "negative seed": Bad(sets("seed=-1"), "seed", ("2**32 - 1", "-1")),
    "rounds 10**12 on a dry run": Bad(
        sets("rounds=1000000000000"), "rounds", ("must be in [1, 100,000]",), dry_run=True
    ),
    "threads 0": Bad(sets("threads=0"), "threads", ("must be >= 1",)),
    "more shards than samples": Bad(
        sets("partition=shards", "shards_per_client=200"),
        "shards_per_client",
        ("1600 shards", "1437 samples"),
    ),  # fmt: skip
    "fewer samples in the files than clients": Bad(
        (),
        "num_clients",
        ("cannot split 20 samples over 30 clients", "20 training samples"),
        file=TINY_CIFAR.replace("{clients}", "30"),
        setup=tiny_cifar,
    ),  # fmt: skip
    "fewer samples in the files than shards": Bad(
        sets("partition=shards", "shards_per_client=3"),
        "shards_per_client",
        ("over 24 clients", "20 training samples"),
        file=TINY_CIFAR.replace("{clients}", "8"),
        setup=tiny_cifar,
    ),  # fmt: skip
    # -- the outside world: Ray, the cluster's resources, MLflow
    "--address where no Ray listens": Bad(
        ("--address", "127.0.0.1:9", *sets("runtime=ray")), "--address", ("no Ray cluster",)
    ),
    "RAY_ADDRESS where no Ray listens": Bad(
        sets("runtime=ray"),
        "RAY_ADDRESS",
        ("no Ray cluster",),
        env=(("RAY_ADDRESS", "127.0.0.1:9"),),
    ),
    "sweep with RAY_ADDRESS where no Ray listens": Bad(
        (), "RAY_ADDRESS", ("no Ray cluster",), cli="sweep", env=(("RAY_ADDRESS", "127.0.0.1:9"),)
    ),
    "--address not host:port": Bad(
        ("--address", "nowhere", *sets("runtime=ray")), "--address", ("HOST:PORT",)
    ),
    "server GPU on a cluster without": Bad(
        sets("runtime=ray", "server_gpus=1"), "server_gpus", ("1 GPU", "no node"), ray=True
    ),
    "client GPU share on a cluster without": Bad(
        sets("runtime=ray", "client_gpus=0.5"), "client_gpus", ("0.5 GPU",), ray=True
    ),
    "client_cpus beyond the cluster": Bad(
        sets("runtime=ray", "client_cpus=100"),
        "client_cpus",
        ("100 CPU", "no node", "most on one node: 2"),
        ray=True,
    ),  # fmt: skip
    "more client actors than CPUs": Bad(
        sets("runtime=ray", "num_client_actors=3"),
        "client_cpus",
        ("3 CPU in all", "has 2"),
        ray=True,
    ),  # fmt: skip
    "accelerator the cluster lacks": Bad(
        sets("runtime=ray", "server_accelerator=H100"), "server_accelerator", ("H100",), ray=True
    ),
    "sweep trials beyond the cluster": Bad(
        sets("runtime=ray", "client_cpus=100"), "client_cpus", ("100 CPU",), cli="sweep", ray=True
    ),
    "MLflow server unreachable": Bad(
        (),
        "MLFLOW_TRACKING_URI",
        ("cannot reach",),
        cli="sweep",
        env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:9"),),
    ),  # fmt: skip
    "sqlite store under a file": Bad(
        (),
        "MLFLOW_TRACKING_URI",
        ("afile exists and is not a folder",),
        cli="sweep",
        setup=make_file,
        env=(("MLFLOW_TRACKING_URI", "sqlite:///{tmp}/afile/mlflow.db"),),
    ),  # fmt: skip
}


def argv_for(case: Bad, tmp: Path) -> list[str]:
    if case.file == MISSING:
        config = tmp / "missing.yaml"
    elif case.file == FOLDER:
        config = tmp / "a_folder"
        config.mkdir()
    elif isinstance(case.file, bytes):
        config = tmp / "config.yaml"
        config.write_bytes(case.file)
    elif case.file is not None:
        config = tmp / "config.yaml"
        config.write_text(case.file.replace("{tmp}", str(tmp)))
    else:
        config = DEMO if case.cli == "run" else ROOT / "configs" / "demo_sweep.yaml"
    argv = ["--config", str(config), *(a.replace("{tmp}", str(tmp)) for a in case.args)]
    if case.dry_run:
        argv.append("--dry-run")
    elif case.cli == "run" and "--out" not in argv and "--json" not in argv:
        argv += ["--out", str(tmp / "out")]
    if case.cli == "sweep" and "--results-dir" not in argv:
        argv += ["--results-dir", str(tmp / "results")]
    return argv


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root, with its size and modification time."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def assert_config_error(case: Bad, rc: int, out: str, err: str) -> None:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    assert out == ""
    # Ray, where a case starts it, may log its own lines; ours is the one error line
    lines = [ln for ln in err.splitlines() if ln.startswith("fslsage:") or not case.ray]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"fslsage: config error: {case.key}: "), line
    for fragment in case.says:
        assert fragment in line, (fragment, line)


def test_table_is_big_enough():
    assert len(BAD) >= 40


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path, monkeypatch, capsys, request):
    case = BAD[name]
    if case.ray:
        request.getfixturevalue("ray_session")
    work = tmp_path / "cwd"  # the default results/ would land here
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for key, value in case.env:
        monkeypatch.setenv(key, value.replace("{tmp}", str(tmp_path)))
    if case.setup is not None:
        case.setup(tmp_path)
    argv = argv_for(case, tmp_path)
    before = tree(tmp_path)
    rc = (run if case.cli == "run" else sweep).main(argv)
    out, err = capsys.readouterr()
    assert_config_error(case, rc, out, err)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["misspelt key", "invalid YAML file", "binary config file"])
def test_bad_input_subprocess(name, tmp_path):
    case = BAD[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fslsage.run", *argv_for(case, tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_config_error(case, proc.returncode, proc.stdout, proc.stderr)
