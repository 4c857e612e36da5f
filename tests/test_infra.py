"""Cluster infrastructure, validated by parsing (no Docker or Kubernetes here): ray_cluster.yaml against
Ray's own autoscaler schema, the Dockerfile, the KubeRay manifests, and every command they and the
operations guide run (python -m jobs.X with its config and overrides, r2f subcommands, make targets)."""
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs import common
from pipeline import cli
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
IMAGE_ROOT = "/home/ray/r2former-pipeline/"  # WORKDIR of infra/Dockerfile


def _pyproject_pin(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{re.escape(name)}==([0-9.]+)"', text)
    assert m, f"{name} is not pinned in pyproject.toml"
    return m.group(1)


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))


def _r2f_commands() -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


def check_job_command(command: str) -> str:
    """``python -m jobs.X --config C [--set k=v]...`` parses, C exists in the project, and C plus
    the overrides load into the stage's config class. Returns X."""
    argv = shlex.split(command)
    i = argv.index("-m")
    assert argv[i - 1] in ("python", "python3"), command
    module = argv[i + 1]
    assert module.startswith("jobs."), command
    name = module.split(".", 1)[1]
    assert (ROOT / "jobs" / f"{name}.py").exists(), f"{module} does not exist"
    spec = importlib.import_module(module).SPEC
    args = common.build_parser(spec).parse_args(argv[i + 2:])
    config = args.config
    if config.startswith(IMAGE_ROOT):
        config = config[len(IMAGE_ROOT):]
    assert (ROOT / config).exists(), f"{command}: config {config} is not in the project"
    load_config(spec.config_class, ROOT / config, args.overrides)
    return name


# ---------------------------------------------------------------- ray_cluster.yaml
def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # jsonschema of this Ray version, plus its own checks

    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].split(".")[0][0] in "gp"  # a GPU instance family
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= raw["max_workers"]  # autoscaling from zero

    # the project is installed by its own `make venv`, with the gpu extra on GPU workers
    targets = _make_targets()
    setup = " ".join(raw["head_setup_commands"] + raw["worker_setup_commands"])
    for target in re.findall(r"make (\w+)", setup):
        assert target in targets
    assert "EXTRA=gpu" in " ".join(raw["worker_setup_commands"])
    assert "EXTRA" in (ROOT / "Makefile").read_text()
    assert raw["file_mounts"] and ".venv" in raw["rsync_exclude"]
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert ".venv/bin/ray" in cmd
    assert any("--head" in c for c in raw["head_start_ray_commands"])


# ---------------------------------------------------------------- Dockerfile
def test_dockerfile_cuda_base_pinned_torch_project_installed():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert "nvidia/cuda" in args["CUDA_IMAGE"] and re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
    assert args["TORCH_VERSION"] == _pyproject_pin("torch")
    assert args["TORCHVISION_VERSION"] == _pyproject_pin("torchvision")
    assert 'pip install ".[gpu]"' in text and "pip install --no-deps -e ." in text
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the project"
    assert re.search(r"^WORKDIR " + re.escape(IMAGE_ROOT.rstrip("/")) + "$", text, re.M)


# ---------------------------------------------------------------- KubeRay
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__  # the image's Ray (pyproject pin) = this Ray
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_c = head["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265}
    groups = spec["workerGroupSpecs"]
    gpu = next(g for g in groups if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    images = {head_c["image"]} | {g["template"]["spec"]["containers"][0]["image"] for g in groups}
    assert len(images) == 1  # one image for head and workers
    assert spec.get("authOptions", {}).get("mode") == "token"


def test_kuberay_manifests_have_required_keys_and_runnable_commands():
    kinds = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: {key} missing"
            kinds.setdefault(doc["kind"], []).append((path.name, doc))
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Secret"} <= set(kinds)

    (_, cluster), = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"])

    (_, job), = kinds["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert check_job_command(job["spec"]["entrypoint"]) == "extract"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(job["spec"]["rayClusterSpec"])

    (_, cron), = kinds["RayCronJob"]
    assert cron["apiVersion"] == "ray.io/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    template = cron["spec"]["jobTemplate"]
    assert check_job_command(template["entrypoint"]) == "reindex"
    _check_cluster_spec(template["rayClusterSpec"])

    (_, kcron), = kinds["CronJob"]
    assert kcron["apiVersion"] == "batch/v1" and kcron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(kcron["spec"]["schedule"].split()) == 5
    container = kcron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"]
    service = f"http://{cluster['metadata']['name']}-head-svc:8265"  # KubeRay's head service name
    assert command[command.index("--address") + 1] == service
    assert check_job_command(shlex.join(command[command.index("--") + 1:])) == "reindex"

    # the secrets every pod reads exist in the example
    secret_names = {d["metadata"]["name"] for _, d in kinds["Secret"]}
    assert {"r2f-storage", "r2f-ray-auth"} <= secret_names
    assert "auth_token" in next(d for _, d in kinds["Secret"] if d["metadata"]["name"] == "r2f-ray-auth")["stringData"]


# ---------------------------------------------------------------- commands in the docs
DOCS = ("infra/OPERATIONS.md", "ray_cluster.yaml", "jobs/common.py", "README.md")


@pytest.mark.parametrize("doc", DOCS)
def test_commands_in_docs_exist(doc):
    text = (ROOT / doc).read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join continued shell lines
    for name in re.findall(r"python -m jobs\.(\w+)", text):
        assert (ROOT / "jobs" / f"{name}.py").exists(), f"{doc}: jobs.{name}"
    subcommands = _r2f_commands()
    for name in re.findall(r"(?<![\w/-])r2f ([a-z]+)\b", text):
        assert name in subcommands, f"{doc}: r2f {name}"
    targets = _make_targets()
    for name in re.findall(r"`make (\w+)", text):
        assert name in targets, f"{doc}: make {name}"
    for path in re.findall(r"(?<![\w/.])((?:infra|configs|jobs)/[\w./-]+\.(?:yaml|py|md))", text):
        assert (ROOT / path).exists(), f"{doc}: {path}"
    for cmd in re.findall(r"(python -m jobs\.\w+ --config configs/jobs/\w+\.yaml(?: --set \S+)*)", text):
        check_job_command(cmd)


def test_submit_command_is_the_documented_one():
    cmd = common.submit_command("reindex", "configs/jobs/reindex.yaml", overrides=["keep_versions=2"])
    text = (ROOT / "infra" / "OPERATIONS.md").read_text()
    excludes = cmd[cmd.index("--runtime-env-json") + 1]
    assert excludes in text  # the guide shows exactly what the code submits
    assert check_job_command(shlex.join(cmd[cmd.index("--") + 1:])) == "reindex"


def test_xdist_units_name_the_modules_that_share_session_fixtures():
    """`make test` runs on pytest-xdist workers by module (conftest.XDIST_UNITS): the modules that
    share tests/s3_runs.py's session fixtures must go to one worker, or each worker makes them again."""
    from conftest import XDIST_UNITS

    tests = Path(__file__).resolve().parent
    uses = re.compile(r'^pytest_plugins = \[.*"s3_runs"', re.M)
    sharing = {f"tests/{p.name}" for p in tests.glob("test_*.py") if uses.search(p.read_text())}
    assert sharing and set(XDIST_UNITS) == sharing
    assert len(set(XDIST_UNITS.values())) == 1
