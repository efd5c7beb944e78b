"""Every file in cluster/ parses and names what it must: the Ray launcher configs pass Ray's own
cluster-config schema and install torch before opt_study; the KubeRay manifests mount the study
and run `opt-study run` on it; the SLURM scripts are valid bash using the two Ray start patterns;
the MLflow server uses PostgreSQL and binds loopback; the README walks through every file."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from opt_study.validate import load_study

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
README = (CLUSTER / "README.md").read_text()
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
YAMLS = [p for p in FILES if p.suffix in (".yaml", ".yml")]
SCRIPTS = [p for p in FILES if p.suffix in (".sh", ".sbatch")]


def load(rel: str):
    docs = list(yaml.safe_load_all((CLUSTER / rel).read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), rel
    return docs[0]


def walk(node):
    """Every mapping in a parsed YAML tree."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_the_folder_has_every_kind_of_file():
    names = {p.relative_to(CLUSTER).as_posix() for p in FILES}
    assert {
        "README.md",
        "aws.yaml",
        "gcp.yaml",
        "docker/Dockerfile",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/study-configmap.yaml",
        "kuberay/storage.yaml",
        "slurm/symmetric_run.sbatch",
        "slurm/ray_cluster.sbatch",
        "mlflow/docker-compose.yaml",
        "mlflow/run_server.sh",
    } <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ------------------------------------------------------------------------------ Ray cluster launcher
@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_config_passes_rays_schema_and_installs_torch_first(name, provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    validate_config(prepare_config(cfg))  # what `ray up` runs before launching anything
    assert cfg["provider"]["type"] == provider
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 8]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch==", c))
    pkg_at = next(i for i, c in enumerate(setup) if "pip install" in c and "opt_study" in c)
    assert torch_at < pkg_at, "torch must be installed before opt_study (as the Makefile does)"
    mount = next(c for c in setup if " mount " in c)
    assert "/mnt/shared" in mount and "nfs" in mount
    assert any("unset DS_ACCELERATOR" in c for c in setup)
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    assert "." in cfg["file_mounts"].values() and ".venv" in cfg["rsync_exclude"]


# -------------------------------------------------------------------------------------- KubeRay
def pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]
    ]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType") == "ClusterIP"
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu", 0)
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert gpus and max(gpus) == 8
    for pod in pod_specs(spec):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"opt-study-shared"}
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert "/mnt/shared" in mounts
    head = spec["headGroupSpec"]["template"]["spec"]
    assert {"name": "study", "configMap": {"name": "opt-study-study"}} in head["volumes"]
    assert any(m["mountPath"] == "/etc/opt-study" for m in head["containers"][0]["volumeMounts"])


def test_raycluster_manifest():
    rc = load("kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(rc["spec"])


def test_rayjob_runs_opt_study_on_the_configmap_study(tmp_path):
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["opt-study", "run"] and entry[2] == "/etc/opt-study/study.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    cm = load("kuberay/study-configmap.yaml")
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", "opt-study-study")
    (tmp_path / "study.yaml").write_text(cm["data"]["study.yaml"])
    spec = load_study(tmp_path / "study.yaml")  # the study the job runs is a valid one
    assert str(spec.study_dir).startswith("/mnt/shared/") and spec.workload.params.data_dir.startswith("/mnt/shared/")
    assert spec.scale.gpus_per_worker == 1 and spec.scale.workers <= 8


def test_storage_claim_is_read_write_many():
    pvc = load("kuberay/storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "opt-study-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_image_installs_torch_before_opt_study():
    lines = [line for line in (CLUSTER / "docker" / "Dockerfile").read_text().splitlines() if line.startswith("RUN")]
    torch_at = next(i for i, line in enumerate(lines) if 'pip install --no-cache-dir "torch==' in line)
    pkg_at = next(i for i, line in enumerate(lines) if "pip install --no-cache-dir -e ." in line)
    assert torch_at < pkg_at
    rules = [
        r
        for r in (CLUSTER / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if r and not r.startswith("#")
    ]
    assert rules[0] == "*" and {"!pyproject.toml", "!README.md", "!opt_study/"} <= set(rules)


# ------------------------------------------------------------------------------------ SLURM, shell
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(path):
    bash = shutil.which("bash")
    r = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    assert text.startswith("#!") and "set -euo pipefail" in text


def test_symmetric_run_script():
    text = (CLUSTER / "slurm" / "symmetric_run.sbatch").read_text()
    assert "#SBATCH --exclusive" in text and "#SBATCH --gpus-per-node=8" in text
    assert re.search(r"ray symmetric-run --address \S+ --min-nodes", text)
    assert re.search(r"\n\s+-- env RAY_ADDRESS=\S+ opt-study run \"\$STUDY\"", text)
    assert "--dashboard-host=127.0.0.1" in text and "unset DS_ACCELERATOR" in text


def test_classic_script_uses_per_job_port_ranges():
    text = (CLUSTER / "slurm" / "ray_cluster.sbatch").read_text()
    assert "ray start --head" in text and 'ray start --address="$RAY_ADDRESS"' in text
    for flag in (
        "--min-worker-port",
        "--max-worker-port",
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-grpc-port",
        "--dashboard-agent-listen-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
        "--dashboard-port",
        "--temp-dir",
    ):
        assert flag in text, flag
    assert "SLURM_JOB_ID % 220) * 100" in text and 'opt-study run "$STUDY"' in text
    # The block arithmetic stays below the ephemeral range for every job id.
    base = max(10000 + (j % 220) * 100 for j in range(1000))
    assert base + 99 < 32768


def ray_flags(text: str) -> set[str]:
    """The `--flags` a script passes to `ray start` / `ray symmetric-run`: on those command lines
    (continuations joined, up to the entrypoint's `--`) and in the bash arrays they expand."""
    text = text.replace("\\\n", " ")
    flags = set()
    for line in text.splitlines():
        for cmd in ("ray start", "ray symmetric-run"):
            if cmd in line and not line.lstrip().startswith("#"):
                flags |= set(re.findall(r"(--[a-z][a-z-]+)", line.split(cmd, 1)[1].split(" -- ")[0]))
    for m in re.finditer(r"\b[A-Z_]+=\(", text):  # arrays: NAME=( ... ) with $((...)) inside
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        flags |= set(re.findall(r"(--[a-z][a-z-]+)", text[m.end() : i]))
    return flags


def test_ray_start_flags_exist():
    """Every flag the SLURM scripts pass to `ray start` / `ray symmetric-run` is a real option."""
    from click.testing import CliRunner
    from ray.scripts.scripts import start

    known = set(re.findall(r"(--[a-z][a-z-]+)", CliRunner().invoke(start, ["--help"]).output))
    known |= {"--min-nodes"}  # symmetric-run's own (--address is ray start's too)
    used = set()
    for name in ("symmetric_run.sbatch", "ray_cluster.sbatch"):
        used |= ray_flags((CLUSTER / "slurm" / name).read_text())
    assert {"--head", "--address", "--block", "--min-worker-port", "--min-nodes"} <= used
    assert used <= known, used - known


# ------------------------------------------------------------------------------------------ MLflow
def test_compose_runs_mlflow_on_postgres_bound_to_loopback():
    compose = load("mlflow/docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "mlflow"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:") and "ports" not in services["postgres"]
    cmd = services["mlflow"]["command"]
    uri = cmd[cmd.index("--backend-store-uri") + 1]
    assert uri.startswith("postgresql+psycopg2://") and "@postgres:5432/" in uri
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--artifacts-destination") + 1]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "MLFLOW_DB_PASSWORD=" in (CLUSTER / "mlflow" / "example.env").read_text()
    assert re.search(r"^FROM ghcr.io/mlflow/mlflow:v3\.17\.2$", (CLUSTER / "mlflow" / "Dockerfile").read_text(), re.M)


def test_plain_mlflow_script():
    text = (CLUSTER / "mlflow" / "run_server.sh").read_text()
    assert "exec opt-study mlflow-server" in text and '--host "${MLFLOW_HOST:-127.0.0.1}"' in text
    line = text.split("exec ", 1)[1].replace("\\\n", " ").splitlines()[0]
    line = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", line).replace("$MLFLOW_HOME", "/home/u/opt_study_mlflow")
    args = mlflow_server_args(shlex.split(line))  # the defaults, as the shell expands them
    assert args.port == 5000 and args.home == "/home/u/opt_study_mlflow" and args.artifacts.endswith("/artifacts")


def mlflow_server_args(cmd: list[str]):
    """``opt-study mlflow-server ...`` parsed by the real command's parser (every flag exists)."""
    from opt_study.cli.main import parser

    at = (
        cmd.index("opt-study") if "opt-study" in cmd else next(i for i, c in enumerate(cmd) if c.endswith("/opt-study"))
    )
    assert cmd[at + 1] == "mlflow-server", cmd
    args = parser().parse_args(cmd[at + 1 :])
    assert args.fn.__name__ == "cmd_mlflow_server" and args.host == "127.0.0.1"
    return args


# The paper studies' (and the ConfigMap study's) tracking URI, which the launchers serve.
SERVED = "http://127.0.0.1:5000"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_heads_start_the_mlflow_server(name):
    cfg = load(name)
    [cmd] = [c for c in cfg["head_start_ray_commands"] if "mlflow-server" in c]
    args = mlflow_server_args(shlex.split(cmd.split("nohup", 1)[1].split(">>")[0]))
    assert args.port == 5000 and args.home.startswith("/mnt/shared/") and args.artifacts.startswith("/mnt/shared/")
    assert any("apt-get install" in c and "postgresql" in c for c in cfg["head_setup_commands"])


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_head_pod_runs_the_mlflow_server(name, tmp_path):
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    containers = spec["headGroupSpec"]["template"]["spec"]["containers"]
    [ml] = [c for c in containers if c["name"] == "mlflow"]
    args = mlflow_server_args(ml["command"])
    assert args.port == 5000 and args.home.startswith("/mnt/shared/")
    assert {"name": "shared", "mountPath": "/mnt/shared"} in ml["volumeMounts"]
    cm = load("kuberay/study-configmap.yaml")
    (tmp_path / "study.yaml").write_text(cm["data"]["study.yaml"])
    assert load_study(tmp_path / "study.yaml").tracking_uri == SERVED
    assert "postgresql" in (CLUSTER / "docker" / "Dockerfile").read_text()


@pytest.mark.parametrize("name", ["symmetric_run.sbatch", "ray_cluster.sbatch"])
def test_slurm_scripts_serve_the_studys_mlflow_uri(name):
    text = (CLUSTER / "slurm" / name).read_text()
    start, wait = (
        text.index('opt-study mlflow-server "$STUDY" &'),
        text.index('opt-study mlflow-server "$STUDY" --wait'),
    )
    run = text.index('opt-study run "$STUDY"')
    assert start < wait < run and "trap " in text[start:wait]
    mlflow_server_args(["opt-study", "mlflow-server", "study.yaml", "--wait", "600"])


@pytest.mark.parametrize("name", ["paper_gpt2_124m.yaml", "paper_resnet18_cifar10.yaml", "crowded_valley_gpu.yaml"])
def test_cluster_configs_track_to_the_served_uri(name):
    assert load_study(ROOT / "configs" / name).tracking_uri == SERVED


# ------------------------------------------------------------------------------------------ README
@pytest.mark.parametrize(
    "path", [p for p in FILES if p.name != "README.md"], ids=lambda p: p.relative_to(CLUSTER).as_posix()
)
def test_readme_names_every_file(path):
    assert f"`{path.relative_to(CLUSTER).as_posix()}`" in README


def test_readme_walks_through_every_command():
    for command in (
        "make install",
        "opt-study validate",
        "opt-study run",
        "--dry-run",
        "opt-study status",
        "python -m opt_study.workloads.prepare",
        "docker compose up",
        "run_server.sh",
        "ray up cluster/aws.yaml",
        "ray exec",
        "ray dashboard",
        "ray attach",
        "ray rsync-down",
        "ray down",
        "aws efs create-file-system",
        "aws ssm get-parameter",
        "gcloud filestore",
        "helm install kuberay-operator",
        "docker build",
        "kubectl apply -f cluster/kuberay/rayjob.yaml",
        "kubectl port-forward",
        "sbatch cluster/slurm/symmetric_run.sbatch",
        "sbatch cluster/slurm/ray_cluster.sbatch",
        "ssh -L",
        "mlflow_uri",
    ):
        assert command in README, command


def test_every_placeholder_is_explained():
    used = {m for p in FILES if p.name != "README.md" for m in re.findall(r"REPLACE_WITH_[A-Z_]+", p.read_text())}
    assert used and used <= set(re.findall(r"`(REPLACE_WITH_[A-Z_]+)`", README)), used
