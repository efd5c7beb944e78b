"""Security basics (SECURITY.md): a planted secret never reaches anything a study writes, YAML
goes only through the safe capped loader, services bind to loopback, names cannot leave the
storage root, and the package's source has no eval/exec/unpickling of user input."""

from __future__ import annotations

import ast
import gzip
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opt_study.config import ConfigError
from opt_study.storage import layout
from opt_study.validate import load_study

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "bad_configs"
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "OPT_STUDY_TEST_SECRET", "HF_TOKEN")

# ------------------------------------------------------------------ a planted secret, everywhere

DRIVER = r"""
import json, sys
import ray
from opt_study.validate import load_study
from opt_study.study.run import run_study

spec = load_study(sys.argv[1])
res = run_study(spec, source_text=open(sys.argv[1]).read())
node = ray._private.worker._global_node
print("RESULT " + json.dumps({"ran": res["ran"], "webui_url": node.webui_url}), flush=True)
ray.shutdown()
"""


def _views(path: Path, data: bytes):
    """The bytes of a file and, for containers that compress, what they hold."""
    yield data
    if data[:4] == b"PAR1":  # Parquet pages are zstd-compressed: look at the values
        table = pq.read_table(path)
        yield repr(table.schema.metadata).encode() + repr(table.to_pylist()).encode()
    elif data[:2] == b"\x1f\x8b":
        yield gzip.decompress(data)
    elif data[:4] == b"PK\x03\x04":  # torch.save files and other zips
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                yield z.read(name)


def _files_with(root: Path, needle: str) -> tuple[list[str], int]:
    """(files under root holding needle, as UTF-8 or UTF-16, in any view; files scanned)."""
    forms = (needle.encode(), needle.encode("utf-16-le"))
    hits, n = [], 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            n += 1
            if any(f in v for v in _views(path, path.read_bytes()) for f in forms):
                hits.append(str(path.relative_to(root)))
    return hits, n


def test_the_scan_finds_a_secret_in_compressed_files(tmp_path):
    """The scanner itself can fail: a secret inside compressed Parquet, gzip and zip is found."""
    needle = f"planted-{secrets.token_hex(8)}"
    pq.write_table(
        pa.table({"x": [f"..{needle}.."]}), tmp_path / "a.parquet", compression="gzip", write_statistics=False
    )  # min/max statistics would hold it uncompressed
    (tmp_path / "b.gz").write_bytes(gzip.compress(f"x{needle}x".encode()))
    with zipfile.ZipFile(tmp_path / "c.pt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("data.pkl", f"..{needle}..")
    (tmp_path / "d.txt").write_bytes(f"{needle}".encode("utf-16-le"))
    (tmp_path / "e.bin").write_bytes(b"nothing here")
    for f in ("a.parquet", "b.gz"):  # compressed away: only a decoding view finds it
        assert needle.encode() not in (tmp_path / f).read_bytes()
    hits, n = _files_with(tmp_path, needle)
    assert sorted(hits) == ["a.parquet", "b.gz", "c.pt", "d.txt"] and n == 5


@pytest.mark.slow
def test_planted_secrets_are_not_written_anywhere(tmp_path):
    """A real study (`run_study`, in-process launcher, Ray + DeepSpeed + MLflow + Parquet) run
    in a fresh process whose environment holds the secrets from the start, so the driver, the
    raylet and every Ray worker have them; then every file under the storage root is scanned.
    Each variable gets its own value, so a hit says which one leaked."""
    token = secrets.token_hex(12)
    planted = {k: f"s3cr3t-{i}-{token}" for i, k in enumerate(SECRET_VARS)}
    store = tmp_path / "store"
    spec_file = tmp_path / "sec.yaml"
    spec_file.write_text(
        f"study: {{name: sec, storage: '{store}', seeds: [0]}}\n"
        "workload: {type: quadratic, dim: 8, cols: 4, noise: 0.1}\n"
        "scale: {workers: 1, cpus_per_worker: 1, zero_stage: 0, micro_batch_size: 4}\n"
        "training: {steps: 5, eval_every: 5}\n"
        "optimizers: [{name: sgd, params: {lr: {grid: [0.01, 0.1]}}}]\n"
    )
    assert load_study(spec_file).scale.resolved_launcher == "in_process"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    env = {
        **os.environ,
        **planted,
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(spec_file)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        _check_no_leak(store, ray_tmp, planted, proc)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _check_no_leak(store: Path, ray_tmp: Path, planted: dict[str, str], proc) -> None:
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["ran"] == 2
    assert not result["webui_url"]  # no Ray dashboard was started

    written = {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}
    for var, value in planted.items():
        hits, n = _files_with(store, value)
        assert hits == [], f"{var} leaked into {hits}"
        assert value not in proc.stdout + proc.stderr, f"{var} printed by the run"
    # the scan covered what a study writes: MLflow's store, Parquet, trial records, Ray's folder
    assert {"mlflow.db", "sec/spec.yaml", "sec/trials.parquet"} <= written and n == len(written)
    assert any(w.startswith("sec/steps/") and w.endswith(".parquet") for w in written)
    assert any(w.startswith("sec/trials/") for w in written)
    assert any(w.startswith("sec/ray/") for w in written)
    # the files that hold the study's configuration are its owner's alone (tuner.pkl: under ray/)
    modes = {n: (store / n).stat().st_mode & 0o777 for n in ("sec", "sec/ray", "sec/spec.yaml", "sec/plan.json")}
    assert modes == {"sec": 0o700, "sec/ray": 0o700, "sec/spec.yaml": 0o600, "sec/plan.json": 0o600}
    # Ray's own session folder (RAY_TMPDIR, outside the storage root): Ray Tune copies the AWS
    # credential variables into each trial actor's runtime env and Ray's runtime_env_agent.log
    # records that env (SECURITY.md); no other variable may appear there.
    for var, value in planted.items():
        hits = _files_with(ray_tmp, value)[0]
        if var == "AWS_SECRET_ACCESS_KEY":
            assert all(h.endswith("runtime_env_agent.log") for h in hits), hits
        else:
            assert hits == [], f"{var} leaked into Ray's session folder: {hits}"


# ------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize(
    "name", ["tag_python_object_apply", "tag_python_object_new", "tag_python_name", "tag_custom_include"]
)
def test_yaml_tags_that_construct_objects_are_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the apply/new payloads would create ./pwned
    with pytest.raises(ConfigError) as e:
        load_study(CORPUS / f"{name}.yaml")
    assert e.value.file.endswith(f"{name}.yaml")
    assert list(tmp_path.iterdir()) == []


def test_alias_bomb_is_refused_quickly():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="alias"):
        load_study(CORPUS / "alias_bomb_billion_laughs.yaml")
    assert time.monotonic() - t0 < 2.0


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id
                if isinstance(f, ast.Name)
                else (f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else "?")
            )
            yield name, node


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return k.value
    return None


def test_source_has_no_eval_exec_or_unpickling():
    """Every call in opt_study/: no eval/exec/os.system/pickle loads/shell=True; torch.load only
    with weights_only=True; yaml.load only with the capped SafeLoader subclass."""
    bad, seen = [], {"yaml.load": 0, "torch.load": 0}
    files = sorted((ROOT / "opt_study").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        where = path.relative_to(ROOT)
        for name, node in _calls(ast.parse(path.read_text(), str(path))):
            at = f"{where}:{node.lineno} {name}"
            if (
                name in ("eval", "exec", "os.system", "os.popen", "yaml.unsafe_load", "yaml.full_load")
                or name.split(".")[-1] in ("loads", "load")
                and name.split(".")[0] in ("pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib")
            ):
                bad.append(at)
            if isinstance(_kw(node, "shell"), ast.Constant) and _kw(node, "shell").value is True:
                bad.append(f"{at} shell=True")
            if name == "torch.load":
                seen[name] += 1
                w = _kw(node, "weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    bad.append(f"{at} without weights_only=True")
            if name == "yaml.load":
                seen[name] += 1
                loader = _kw(node, "Loader")
                if not (isinstance(loader, ast.Name) and loader.id == "_CappedLoader"):
                    bad.append(f"{at} with Loader={ast.unparse(loader) if loader else None}")
    assert bad == []
    assert seen["yaml.load"] >= 1  # the scan does see the loader call (and would judge it)
    import yaml

    from opt_study.config.yaml_file import _CappedLoader

    assert issubclass(_CappedLoader, yaml.SafeLoader)


# --------------------------------------------------------------------------- loopback binding
def test_ui_binds_loopback_by_default():
    from opt_study.cli.main import parser

    a = parser().parse_args(["ui", "some/study"])
    assert a.host == "127.0.0.1"
    assert parser().parse_args(["ui", "s", "--host", "0.0.0.0"]).host == "0.0.0.0"  # only if asked


def test_ray_is_started_without_its_dashboard():
    import inspect

    from opt_study.study import run as study

    if hasattr(study, "ray_init_kwargs"):
        kw = study.ray_init_kwargs()
        assert kw["include_dashboard"] is False
    else:  # until the kwargs are factored out: the one ray.init call site says so
        src = inspect.getsource(study.ensure_ray)
        assert "include_dashboard=False" in src and src.count("ray.init(") == 2


# ----------------------------------------------------------------------------- path escapes
@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "../x",
        "a/../../b",
        "/etc",
        "a/b",
        "a\\b",
        "a..b",
        ".hidden",
        "",
        "a\x00b",
        "x" * 129,
        "ü",
        " a",
        "a\nb",
    ],
)
def test_unsafe_names_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="study name"):
        layout.check_name(name, "study name")
    with pytest.raises(ValueError):
        layout.study_dir(tmp_path, name)
    with pytest.raises(ValueError, match="trial id"):
        layout.attempt_dir(tmp_path / "s", name, 0)


def test_a_symlink_cannot_lead_a_study_out_of_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="not directly inside"):
        layout.study_dir(root, "evil")
    assert layout.study_dir(root, "good") == root.resolve() / "good"


@pytest.mark.parametrize(
    "name,field",
    [
        ("name_with_dotdot", "study.name"),
        ("name_with_slash", "study.name"),
        ("name_parent_dir", "study.name"),
        ("label_with_slash", "optimizers[0].label"),
    ],
)
def test_configs_with_escaping_names_are_refused(name, field):
    with pytest.raises(ConfigError) as e:
        load_study(CORPUS / f"{name}.yaml")
    assert e.value.field == field
