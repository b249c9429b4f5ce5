"""Cluster configs in docker/ (issue 22 item 5): docker/cluster.yaml (Ray's cluster launcher) and
docker/rayjob.yaml (KubeRay) declare node types that hold what the code asks for on the paper
sweep they document, and the image runs as a non-root user. No Docker engine, no Ray cluster:
the node types are read the way Ray reads them (the launcher's schema and defaults; the KubeRay
autoscaler's translation of a RayCluster spec), and what a trial and its actors ask for comes
from the project's own functions (tune.resources.trial_demands, fslsage.placement.server_demand,
actor_demands, client_actor_count, check_fits and the sweep's preflight check_cluster), so a
change to those requests (e.g. the name of the S-Server's accelerator resource) fails here."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import ray
import ray.util.accelerators
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config

from actors import runtime as actors_runtime
from fslsage import sweep
from fslsage.config import Config, ConfigError, load_config
from fslsage.placement import actor_demands, check_fits, client_actor_count, server_demand
from tune.resources import TRIAL_SERVER_CPUS, trial_demands

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
CLUSTER_YAML = DOCKER / "cluster.yaml"
RAYJOB_YAML = DOCKER / "rayjob.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
PAPER_CONFIG = ROOT / "configs" / "paper" / "cifar10_resnet18.yaml"
# the large-GPU type (the S-Server's) and the small-GPU type (the client actors'), per file
LARGE = {"cluster.yaml": "gpu_large", "rayjob.yaml": "gpu-large"}
SMALL = {"cluster.yaml": "gpu_small", "rayjob.yaml": "gpu-small"}
SOURCES = list(LARGE)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            instructions.append((op.upper(), args.strip()))
    return instructions


def workdir() -> str:
    return [args for op, args in dockerfile_instructions() if op == "WORKDIR"][-1]


def rayjob_cluster_cr() -> dict:
    """The RayCluster the RayJob makes, as the KubeRay autoscaler reads it."""
    job = load(RAYJOB_YAML)
    metadata = {"name": job["metadata"]["name"], "namespace": "default"}
    return {"metadata": metadata, "spec": job["spec"]["rayClusterSpec"]}


def node_types(source: str) -> dict[str, tuple[dict[str, float], int]]:
    """Node type → (the resources Ray gives each node of it, how many the cluster starts with:
    one head, `min_workers` of each worker type), read with Ray's own code: the launcher's
    defaults and schema (ray up) or the KubeRay autoscaler's translation of the RayCluster."""
    if source == "cluster.yaml":
        config = prepare_config(copy.deepcopy(load(CLUSTER_YAML)))
    else:
        config = _derive_autoscaling_config_from_ray_cr(rayjob_cluster_cr())
    validate_config(config)  # the cluster launcher's / autoscaler's schema (ray-schema.json)
    head = config["head_node_type"]
    types = {}
    for name, node_type in config["available_node_types"].items():
        resources = {k: float(v) for k, v in node_type["resources"].items()}
        types[name] = (resources, 1 if name == head else node_type["min_workers"])
    return types


def starting_nodes(types: dict[str, tuple[dict[str, float], int]]) -> list[dict[str, float]]:
    return [dict(resources) for resources, count in types.values() for _ in range(count)]


def sweep_argv(source: str) -> list[str]:
    """The arguments of the `python -m fslsage.sweep` command the file runs: the RayJob's
    entrypoint, or the command cluster.yaml's comments give `ray job submit`."""
    if source == "rayjob.yaml":
        command = load(RAYJOB_YAML)["spec"]["entrypoint"]
    else:
        text = [line.strip() for line in CLUSTER_YAML.read_text().splitlines()]
        comments = [re.sub(r"^#\s?", "", line) for line in text if line.startswith("#")]
        at = next(i for i, line in enumerate(comments) if "python -m fslsage.sweep" in line)
        lines = [comments[at]]
        while lines[-1].endswith("\\"):  # shell continuation lines
            lines[-1] = lines[-1][:-1]
            lines.append(comments[at + len(lines)])
        command = " ".join(lines)
    words = shlex.split(command[command.index("python -m fslsage.sweep") :])
    return words[3:]


def paper_sweep(source: str) -> tuple[Config, dict]:
    """The config the file's sweep command runs (its path inside the image mapped to this
    checkout) and the base config the sweep plans with."""
    args = sweep.build_parser().parse_args(sweep_argv(source))
    path = args.config
    if path.startswith(workdir() + "/"):  # the checkout inside the image (docker/Dockerfile)
        path = str(ROOT / path.removeprefix(workdir() + "/"))
    assert Path(path).resolve() == PAPER_CONFIG
    cfg = load_config(path, args.overrides)
    return cfg, cfg.to_dict()


def holds(demand, node: dict[str, float]) -> bool:
    try:
        check_fits([demand], [node])
    except ConfigError:
        return False
    return True


@pytest.fixture
def sees(monkeypatch):
    """Makes the sweep's preflight see a cluster of these nodes (ray.cluster_resources and
    actors.runtime.cluster_nodes, what it reads from a live cluster)."""

    def see(nodes: list[dict[str, float]]) -> None:
        totals: dict[str, float] = {}
        for node in nodes:
            for name, amount in node.items():
                totals[name] = totals.get(name, 0.0) + amount
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(totals))
        monkeypatch.setattr(actors_runtime, "cluster_nodes", lambda: [dict(n) for n in nodes])

    return see


# ----------------------------------------------------------------------------- the sweep fits
@pytest.mark.parametrize("source", SOURCES)
def test_the_paper_sweep_fits_the_declared_node_types(source, sees):
    """The sweep's own preflight passes on the cluster the file starts; the S-Server's bundle
    fits only on the large-GPU type (the one declaring the resource the S-Server asks for); the
    trial's client actors and `fslsage.run`'s (runtime: ray) all fit on the small-GPU type."""
    types = node_types(source)
    assert set(types) >= {LARGE[source], SMALL[source]} and len(types) == 3  # head + 2 GPU types
    nodes = starting_nodes(types)
    cfg, base = paper_sweep(source)
    assert cfg.runtime == "ray" and cfg.server_gpus >= 1 and 0 < cfg.client_gpus < 1
    assert cfg.server_accelerator

    sees(nodes)
    sweep.check_cluster(base, None)  # what `fslsage.sweep` checks before starting any trial
    demands = trial_demands(cfg, sweep.cluster_size())
    check_fits(demands, nodes)

    server = server_demand(cfg, cpus=TRIAL_SERVER_CPUS)
    servers = [d for d in demands if d[1] == server]
    assert len(servers) == 1, demands
    assert set(server) - {"CPU", "GPU"}, "the S-Server asks for no accelerator type"
    on = {name for name, (resources, _) in types.items() if holds(servers[0], resources)}
    assert on == {LARGE[source]}, f"the S-Server's {server} fits on {on or 'no node type'}"

    clients = [d for d in demands if d[0].get("GPU") == "client_gpus"]
    client = {"CPU": cfg.client_cpus, "GPU": cfg.client_gpus}
    assert clients and all(amounts == client for _, amounts in clients)
    small = types[SMALL[source]][0]
    check_fits(clients, [dict(small) for _ in range(types[SMALL[source]][1])])

    # runtime: ray without Tune (fslsage.run): the runtime's own count and check
    n = client_actor_count(cfg, nodes)
    assert n == cfg.num_clients  # the starting cluster holds every client as its own actor
    actors = actor_demands(cfg, n)
    check_fits(actors, nodes)
    client_actors = [d for d in actors if d[0].get("GPU") == "client_gpus"]
    assert len(client_actors) == n
    check_fits(client_actors, [dict(small)])  # all of them on one small-GPU node
    # an S-Server asking for another accelerator would wait for ever: the check says so
    other = cfg.replace(server_accelerator=cfg.server_accelerator + "X")
    with pytest.raises(ConfigError, match="^server_accelerator: "):
        check_fits(actor_demands(other, n), nodes)


@pytest.mark.parametrize("source", SOURCES)
def test_a_sweep_trial_gets_as_many_client_actors_as_the_cluster_holds(source, sees):
    """The sweep sizes trials by the cluster's accelerator types too: with only CPUs and GPUs
    the S-Server that asks for one fits nowhere, and each trial got a single client actor."""
    nodes = starting_nodes(node_types(source))
    cfg, _ = paper_sweep(source)
    sees(nodes)
    demands = trial_demands(cfg, sweep.cluster_size())
    clients = [d for d in demands if d[0].get("GPU") == "client_gpus"]
    assert len(clients) == client_actor_count(cfg, nodes) == cfg.num_clients


@pytest.mark.parametrize("source", SOURCES)
def test_the_gpu_types_declare_rays_accelerator_names_and_the_sweep_asks_for_the_large_one(
    source,
):
    """The declared `accelerator_type:X` are the names Ray detects on that hardware (a node
    reports them itself), and `server_accelerator` names the large type's."""
    constants = vars(ray.util.accelerators).items()
    ray_names = {v for k, v in constants if k.isupper() and isinstance(v, str)}
    types = node_types(source)
    declared = {}
    for name in (LARGE[source], SMALL[source]):
        prefix = "accelerator_type:"
        kinds = [k.removeprefix(prefix) for k in types[name][0] if k.startswith(prefix)]
        assert len(kinds) == 1 and kinds[0] in ray_names, (name, kinds)
        declared[name] = kinds[0]
    assert declared[LARGE[source]] != declared[SMALL[source]]
    cfg, _ = paper_sweep(source)
    assert cfg.server_accelerator == declared[LARGE[source]]
    assert "GPU" not in types[next(n for n in types if n not in declared)][0]  # a CPU-only head


def test_both_files_run_the_same_sweep():
    """The same overrides and results folder; the same config (checked in paper_sweep)."""
    launcher, kuberay = (sweep.build_parser().parse_args(sweep_argv(s)) for s in SOURCES)
    assert launcher.overrides == kuberay.overrides
    assert launcher.results_dir == kuberay.results_dir
    assert not launcher.resume and not kuberay.resume


# ----------------------------------------------------------------------------- the files
def test_cluster_yaml_runs_the_image_with_token_auth():
    config = load(CLUSTER_YAML)
    docker = config["docker"]
    assert docker["image"] == project_image()
    options = " ".join(docker["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "--shm-size" in options
    assert "~/.ray/auth_token" in config["file_mounts"]  # the token, at Ray's default path
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("ray start" in c for c in config[key]), key
    assert any("--head" in c for c in config["head_start_ray_commands"])


def test_rayjob_yaml_gpus_match_the_pods_and_run_non_root_with_token_auth():
    job = load(RAYJOB_YAML)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == image_ray_version()
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    pods = [g["template"]["spec"] for g in groups] + [job["spec"]["submitterPodTemplate"]["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"].get("runAsUser", 1000) != 0
        for container in pod["containers"]:
            assert container["image"] == project_image()
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for group in spec["workerGroupSpecs"]:
        pod_resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = group["rayStartParams"]["num-gpus"]
        assert pod_resources["limits"]["nvidia.com/gpu"] == gpus, group["groupName"]
        assert pod_resources["requests"]["nvidia.com/gpu"] == gpus, group["groupName"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


# ----------------------------------------------------------------------------- the image
def project_image() -> str:
    """The image docker/README.md builds (`docker build ... -t NAME .`)."""
    readme = (DOCKER / "README.md").read_text()
    return re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", readme).group(1)


def image_ray_version() -> str:
    base = [args for op, args in dockerfile_instructions() if op == "FROM"][-1]
    return re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", base).group(1)


def test_the_image_runs_as_a_non_root_user():
    ops = dockerfile_instructions()
    users = [args for op, args in ops if op == "USER"]
    assert users, "the Dockerfile sets no USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), users[-1]
    # the project's files belong to that user (pip install -e writes next to them)
    for op, args in ops:
        if op == "COPY":
            assert f"--chown={users[-1]}" in args.split(), args
    assert image_ray_version() == ray.__version__  # the image's Ray is the one tested here
