"""Shared test set-up: CPU DeepSpeed environment, one local Ray cluster per test session, and the
`gpu` marker (GPU tests skip on a machine without one and run where there is one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (a start costs 4-6 s and ~1 GB)."""
    import ray

    from opt_study.study.run import ray_env

    for k, v in ray_env().items():
        os.environ.setdefault(k, v)
    ray.init(
        num_cpus=2,
        runtime_env={"env_vars": ray_env()},
        log_to_driver=False,
        include_dashboard=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def spec_factory(tmp_path):
    """Validated study specs stored under this test's tmp_path (tests/specs.py): a small quadratic
    study with deep-merged overrides. ``spec_factory(training={"steps": 40}, ...)`` -> Spec,
    ``spec_factory.doc(...)`` -> the YAML document, ``spec_factory.write(path, ...)`` -> a YAML file."""
    from specs import SpecFactory  # here, not at the top: opt_study imports torch after the env above

    return SpecFactory(tmp_path)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """An in-process trial sets torch's thread count (scale.torch_threads); restore it so later
    tests run with the interpreter's own setting, whatever ran before them."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
