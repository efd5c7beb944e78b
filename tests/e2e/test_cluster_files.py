"""Every file in cluster/ parses and names what it must: the Ray launcher configs pass Ray's own
cluster-config schema and install torch before opt_study; the KubeRay manifests mount the study
and run `opt-study run` on it, and their MLflow (PostgreSQL, server, Service, Secret) agrees with
itself and with the study's tracking URI; the SLURM scripts are valid bash using the two Ray start
patterns; the MLflow server uses PostgreSQL and binds loopback; the README walks through every
file, and its 4 × 8-GPU walkthrough names only real fields, commands and numbers."""

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
        "kuberay/mlflow.yaml",
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


# ------------------------------------------------------------------- KubeRay: MLflow and its viewer
def kube_objects(rel: str) -> dict[tuple[str, str], dict]:
    """A multi-document manifest as {(kind, name): object}."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / rel).read_text()) if d is not None]
    objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(objs) == len(docs), f"{rel}: two objects of one kind share a name"
    return objs


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def container_port(pod: dict, port) -> int:
    """A Service's targetPort (a number or a container port's name) as the container's number."""
    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert isinstance(port, int) or port in ports, (port, ports)
    return port if isinstance(port, int) else ports[port]


def secret_ref(container: dict, env_name: str) -> tuple[str, str]:
    [ref] = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == env_name]
    return ref["name"], ref["key"]


def workload_and_service(objs: dict, kind: str, name: str):
    """The workload ``kind/name``, its pod template, and the one Service that selects its pods."""
    work = objs[(kind, name)]
    pod = work["spec"]["template"]
    assert selects(work["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]), name
    [svc] = [
        o for (k, _), o in objs.items() if k == "Service" and selects(o["spec"]["selector"], pod["metadata"]["labels"])
    ]
    return work, pod, svc


def test_kuberay_mlflow_server_postgres_and_study_agree(tmp_path):
    """mlflow.yaml's names, ports, labels and secret agree with each other, with the study's
    tracking URI, with the volume the Ray pods mount, and with the commands in the README."""
    from urllib.parse import urlsplit

    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    objs = kube_objects("kuberay/mlflow.yaml")
    dep, ml_pod, ml_svc = workload_and_service(objs, "Deployment", "opt-study-mlflow")
    sts, pg_pod, pg_svc = workload_and_service(objs, "StatefulSet", "opt-study-postgres")
    assert sts["spec"]["serviceName"] == pg_svc["metadata"]["name"]
    [ml], [pg] = ml_pod["spec"]["containers"], pg_pod["spec"]["containers"]

    # The study writes to the MLflow Service by its name and port; the server listens there.
    cm = load("kuberay/study-configmap.yaml")
    (tmp_path / "study.yaml").write_text(cm["data"]["study.yaml"])
    uri = urlsplit(load_study(tmp_path / "study.yaml").tracking_uri)
    [svc_port] = ml_svc["spec"]["ports"]
    assert ml_svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert (uri.scheme, uri.hostname, uri.port) == ("http", ml_svc["metadata"]["name"], svc_port["port"])
    opts = server.make_context("server", ml["command"][2:]).params  # MLflow's own parser: every flag exists
    assert ml["command"][:2] == ["mlflow", "server"]
    assert opts["port"] == container_port(ml_pod["spec"], svc_port["targetPort"]) and opts["host"] == "0.0.0.0"
    allowed = opts["allowed_hosts"].split(",")  # MLflow's own Host check: the driver's, port-forward's
    for host in (uri.netloc, f"127.0.0.1:{opts['port']}", f"localhost:{opts['port']}"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, f"evil.example:{opts['port']}")
    assert opts["serve_artifacts"] and opts["artifacts_destination"].startswith("/mnt/shared/")
    assert {"name": "shared", "mountPath": "/mnt/shared"} in ml["volumeMounts"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in ml_pod["spec"]["volumes"]}
    assert claims == {load("kuberay/storage.yaml")["metadata"]["name"]}

    # MLflow reaches PostgreSQL by its Service, as the database's user, with the same secret.
    db = urlsplit(opts["backend_store_uri"])
    pg_env = {e["name"]: e.get("value") for e in pg["env"]}
    [pg_port] = pg_svc["spec"]["ports"]
    assert db.scheme == "postgresql+psycopg2" and db.password is None  # the password: PGPASSWORD
    assert (db.hostname, db.port) == (pg_svc["metadata"]["name"], pg_port["port"])
    assert container_port(pg_pod["spec"], pg_port["targetPort"]) == 5432
    assert (db.username, db.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    secret = secret_ref(ml, "PGPASSWORD")
    assert secret == secret_ref(pg, "POSTGRES_PASSWORD")
    assert f"kubectl create secret generic {secret[0]} --from-literal={secret[1]}=" in README
    mount = {m["name"]: m["mountPath"] for m in pg["volumeMounts"]}
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert pg_env["PGDATA"].startswith(mount[claim["metadata"]["name"]] + "/")

    # Who may connect: pods labelled as KubeRay labels a head (the drivers) to MLflow, MLflow to PostgreSQL.
    head_labels = {"ray.io/node-type": "head", "ray.io/cluster": "any"}
    for target, svc, source in ((ml_pod, ml_svc, head_labels), (pg_pod, pg_svc, ml_pod["metadata"]["labels"])):
        [policy] = [
            o
            for (k, _), o in objs.items()
            if k == "NetworkPolicy" and selects(o["spec"]["podSelector"]["matchLabels"], target["metadata"]["labels"])
        ]
        [rule] = policy["spec"]["ingress"]
        [peer] = rule["from"]
        assert selects(peer["podSelector"]["matchLabels"], source), policy["metadata"]["name"]
        assert [p["port"] for p in rule["ports"]] == [
            container_port(target["spec"], svc["spec"]["ports"][0]["targetPort"])
        ]

    # The same image as the Ray pods (MLflow and psycopg2 come with opt_study), checked on import.
    assert (
        ml["image"]
        == load("kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert re.search(r"python -c \"import [^\"]*\bmlflow, psycopg2", (CLUSTER / "docker" / "Dockerfile").read_text())
    assert f"kubectl port-forward svc/{ml_svc['metadata']['name']} {svc_port['port']}:{svc_port['port']}" in README


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_heads_leave_mlflow_to_the_service(name):
    """One MLflow server for every KubeRay study (mlflow.yaml): a Ray head runs none of its own."""
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    for pod in pod_specs(spec):
        assert [c["name"] for c in pod["containers"]] in (["ray-head"], ["ray-worker"])
    assert "cluster/kuberay/mlflow.yaml" in (CLUSTER / name).read_text()


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


WALKTHROUGH = README.split("## 4 nodes × 8 GPUs", 1)[-1].split("\n## ", 1)[0]


def test_walkthrough_names_real_fields_commands_and_numbers(tmp_path):
    """The 4 × 8-GPU walkthrough: every `slice.field` it names is a field of the study config
    (the workload's: of the ConfigMap study's type), every `opt-study` subcommand and file it
    names exists, and its numbers are the files' (4 nodes of 8 GPUs, 8-rank trials, 4 at once)."""
    import argparse
    from dataclasses import fields

    from opt_study.cli.main import parser
    from opt_study.config.spec import ScaleConfig, SearchConfig, StudyConfig
    from opt_study.plan.planners import plan_trials
    from opt_study.study.resources import max_concurrent

    assert WALKTHROUGH.startswith(":") and "Rehearse" in WALKTHROUGH
    (tmp_path / "study.yaml").write_text(load("kuberay/study-configmap.yaml")["data"]["study.yaml"])
    spec = load_study(tmp_path / "study.yaml")
    known = {
        k: {f.name for f in fields(c)}
        for k, c in (("study", StudyConfig), ("scale", ScaleConfig), ("search", SearchConfig))
    }
    known["workload"] = {f.name for f in fields(spec.workload.params)}
    named = set(re.findall(r"`(study|scale|search|workload)\.([a-z_]+)", WALKTHROUGH))
    assert {("scale", "workers"), ("scale", "accelerator"), ("search", "max_concurrent_trials")} <= named
    assert {("study", "storage"), ("study", "mlflow_uri")} <= named
    assert all(field in known[part] for part, field in named), [n for n in named if n[1] not in known[n[0]]]
    [sub] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    used = set(re.findall(r"opt-study ([a-z][a-z-]+)", WALKTHROUGH))
    assert {"run", "status", "query"} <= used <= set(sub.choices), used - set(sub.choices)
    for rel in set(re.findall(r"`((?:kuberay/)?[a-z-]+\.yaml)`", WALKTHROUGH)):
        assert (CLUSTER / rel).is_file(), rel
    [group] = load("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]
    [worker] = group["template"]["spec"]["containers"]
    assert (group["replicas"], group["maxReplicas"], worker["resources"]["limits"]["nvidia.com/gpu"]) == (0, 4, 8)
    assert (spec.scale.workers, spec.scale.gpus_per_worker, spec.scale.device) == (8, 1, "cuda")
    assert spec.scale.workers * spec.scale.cpus_per_worker <= int(worker["resources"]["requests"]["cpu"])
    most = {"CPU": 4 * float(worker["resources"]["requests"]["cpu"]), "GPU": 4 * 8.0}  # the autoscaler's maximum
    n = len(plan_trials(spec))
    assert max_concurrent(spec, most) == 4 and f"{n} trials to run, 4 at a time" in WALKTHROUGH
    assert f"`trials: {n}`" in WALKTHROUGH


def test_every_placeholder_is_explained():
    used = {m for p in FILES if p.name != "README.md" for m in re.findall(r"REPLACE_WITH_[A-Z_]+", p.read_text())}
    assert used and used <= set(re.findall(r"`(REPLACE_WITH_[A-Z_]+)`", README)), used
