"""Plugins: a workload, an optimizer and a metric named by import path or by entry point.

The user package is written into tmp_path (and, for entry points, registered by a real
``.dist-info`` folder on sys.path, which is what ``pip install`` leaves in site-packages), so
these tests exercise the same import machinery a study does.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pyarrow as pa
import pytest

from opt_study import optim, plugins, workloads
from opt_study.cli.main import main
from opt_study.config import ConfigError
from opt_study.measure.extra import ExtraMetrics
from opt_study.results.step_cells import rows_table
from opt_study.validate import imported_modules

PLUGIN_SRC = textwrap.dedent(
    """
    from dataclasses import dataclass

    import torch

    from opt_study import ELEMENTWISE, OptimizerEntry, Workload
    from opt_study.config import FieldError
    from opt_study.workloads.quadratic import QuadraticConfig, QuadraticWorkload


    @dataclass(frozen=True)
    class ScaledConfig(QuadraticConfig):
        scale: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            if not self.scale > 0:
                raise FieldError("scale", f"must be > 0, got {self.scale!r}")


    class Scaled(QuadraticWorkload):
        config_class = ScaledConfig

        def loss(self, model, batch):
            return self.cfg.scale * super().loss(model, batch)


    class NotAWorkload:
        pass


    def make_sgd():
        return OptimizerEntry(
            name="plain_sgd",
            factory=lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay),
            defaults={"lr": 0.1, "weight_decay": 0.0},
            paper="https://doi.org/10.1214/aoms/1177729586",
            space={"lr": {"loguniform": [1e-3, 1.0]}},
            combos=ELEMENTWISE,
            source="test plugin",
        )


    def double_loss(row):
        return {"double_loss": 2 * row["loss"]}
    """
)


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    """A package `userpkg_<n>` (unique: modules are cached per name) with the plugins above."""
    name = f"userpkg_{abs(hash(tmp_path)) % 10**8}"
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("")
    (site / name / "plug.py").write_text(PLUGIN_SRC)
    monkeypatch.syspath_prepend(str(site))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _plugin_slices(pkg: str, **over) -> dict:
    return {
        "workload": {"type": f"{pkg}.plug:Scaled", "dim": 4, "cols": 2, "scale": 2.0},
        "optimizers": [{"name": f"{pkg}.plug:make_sgd", "params": {"lr": {"grid": [0.1, 0.2]}}}],
        "measure": {"every": 1, "extra": [f"{pkg}.plug:double_loss"]},
        **over,
    }


def test_import_path_plugins_validate_like_builtins(spec_factory, userpkg):
    spec = spec_factory(**_plugin_slices(userpkg))
    # typed params: the plugin's own dataclass, its validated value
    assert type(spec.workload.params).__name__ == "ScaledConfig" and spec.workload.params.scale == 2.0
    assert spec.optimizers[0].label == "make_sgd"  # a ':' cannot be in a label: the attribute
    assert spec.optimizers[0].defaults == {"lr": 0.1, "weight_decay": 0.0}
    assert imported_modules(spec) == [
        f"{userpkg}.plug:Scaled: module {userpkg}.plug",
        f"{userpkg}.plug:make_sgd: module {userpkg}.plug",
        f"{userpkg}.plug:double_loss: module {userpkg}.plug",
    ]
    w = workloads.make_workload(spec.workload.type, spec.workload.params, 0)
    model = w.build_model()
    batch = w.train_batch(0, 0, 4)
    base = workloads.make_workload("quadratic", workloads.QuadraticConfig(dim=4, cols=2), 0)
    assert w.loss(model, batch).item() == pytest.approx(2 * base.loss(model, batch).item())
    opt = optim.build_optimizer(spec.optimizers[0].name, model.parameters(), {"lr": 0.2})
    assert opt.param_groups[0]["lr"] == 0.2


def test_builtin_names_never_import(spec_factory, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a built-in name imported user code")

    monkeypatch.setattr(plugins, "_import", refuse)
    monkeypatch.setattr(plugins, "_entry_point", refuse)
    spec = spec_factory(optimizers=[{"name": "adamw"}], measure={"every": 1})
    assert imported_modules(spec) == []


@pytest.mark.parametrize(
    ("over", "field", "words"),
    [
        ({"workload": {"type": "{pkg}.plug:Scaled", "dim": 4, "cols": 2, "scale": -1.0}}, "workload.scale", "> 0"),
        ({"workload": {"type": "{pkg}.plug:Scaled", "dim": 4, "cols": 2, "speed": 1}}, "workload.speed", "unknown"),
        ({"workload": {"type": "{pkg}.plug:NotAWorkload"}}, "workload.type", "not a subclass"),
        ({"workload": {"type": "{pkg}.nowhere:X"}}, "workload.type", "cannot import module"),
        ({"workload": {"type": "{pkg}.plug:Missing"}}, "workload.type", "no attribute"),
        ({"optimizers": [{"name": "{pkg}.plug:Scaled"}]}, "optimizers[0].name", "OptimizerEntry"),
        ({"optimizers": [{"name": "{pkg}.plug:make_sgd", "params": {"lr": -1.0}}]}, "optimizers[0].params.lr", "lr"),
        ({"optimizers": [{"name": "{pkg}.plug:make_sgd", "params": {"beta": 0.9}}]}, "optimizers[0].params.beta", ""),
        ({"measure": {"every": 1, "extra": ["{pkg}.plug:gone"]}}, "measure.extra[0]", "no attribute"),
        ({"workload": {"type": "no_such_workload"}}, "workload.type", "unknown workload"),
    ],
)
def test_a_bad_plugin_config_is_one_line_naming_file_and_field(
    tmp_path, userpkg, spec_factory, capsys, over, field, words
):
    over = json.loads(json.dumps(over).replace("{pkg}", userpkg))
    f = spec_factory.write(tmp_path / "bad.yaml", **over)
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {f}: {field}: ") and words in err


def test_entry_point_plugins_are_found_after_install(tmp_path, monkeypatch, spec_factory):
    """A package registers names in the three groups: a real .dist-info (as pip leaves it)."""
    site = tmp_path / "site"
    pkg = site / "eppkg_plugins"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN_SRC)
    dist = site / "eppkg_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: eppkg-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[opt_study.workloads]\nscaled_quad = eppkg_plugins:Scaled\n\n"
        "[opt_study.optimizers]\nplain_sgd = eppkg_plugins:make_sgd\n\n"
        "[opt_study.metrics]\ndouble_loss = eppkg_plugins:double_loss\n"
    )
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "scaled_quad" in plugins.entry_point_names(plugins.WORKLOADS_GROUP)
        spec = spec_factory(
            workload={"type": "scaled_quad", "dim": 4, "cols": 2, "scale": 3.0},
            optimizers=[{"name": "plain_sgd"}],
            measure={"every": 1, "extra": ["double_loss"]},
        )
        assert spec.workload.params.scale == 3.0 and spec.optimizers[0].label == "plain_sgd"
        lines = imported_modules(spec)
        assert lines[0] == (
            "scaled_quad: entry point opt_study.workloads:scaled_quad = eppkg_plugins:Scaled "
            "(package eppkg-plugins 0.1)"
        )
        assert len(lines) == 3
    finally:
        sys.modules.pop("eppkg_plugins", None)
    # once uninstalled (off the path), the name is unknown again, with the known names listed
    monkeypatch.undo()
    with pytest.raises(
        ConfigError,
        match=r"workload\.type: unknown workload 'scaled_quad' \(allowed: .*quadratic.*, or module:Class\)$",
    ):
        spec_factory(workload={"type": "scaled_quad"})


def test_extra_metrics_values_and_errors(userpkg):
    extra = ExtraMetrics((f"{userpkg}.plug:double_loss",))
    assert extra({"loss": 1.25, "step": 3}) == {"double_loss": 2.5}
    assert not ExtraMetrics(())
    bad = ExtraMetrics((f"{userpkg}.plug:double_loss", f"{userpkg}.plug:double_loss"))
    with pytest.raises(ValueError, match="also returned by another metric"):
        bad({"loss": 1.0})


def test_extra_column_round_trips_through_parquet_and_duckdb(tmp_path):
    from opt_study.results.parquet import StepWriter, read_steps
    from opt_study.results.query import query

    with StepWriter(tmp_path, "t-000-s0", 0, start_step=0) as w:
        w.append({"step": 0, "time_unix": 1.0, "loss": 2.0, "measured": True, "extra": {"eos_ratio": 0.25}})
        w.append({"step": 1, "time_unix": 2.0, "loss": 1.0, "measured": False})
    steps = read_steps(tmp_path)
    assert steps["extra"].type == pa.map_(pa.string(), pa.float64())
    assert steps["extra"].to_pylist() == [[("eos_ratio", 0.25)], None]
    got = query(tmp_path, "SELECT step, extra['eos_ratio'] AS e FROM steps ORDER BY step").to_pylist()
    e0 = got[0]["e"]
    assert (e0[0] if isinstance(e0, list) else e0) == 0.25 and not got[1]["e"]
    with pytest.raises(TypeError, match="column 'extra'"):
        rows_table([{"step": 0, "time_unix": 1.0, "extra": {"x": "high"}}], "t", 0)
    assert math.isnan(ExtraMetrics.__call__.__globals__["_number"]("m", "k", None))


def test_python_api_loads_and_reads_a_study(tmp_path, spec_factory):
    import opt_study
    from opt_study.results.parquet import StepWriter
    from opt_study.results.trials import write_trial_record

    assert opt_study.Workload is workloads.Workload and opt_study.OptimizerEntry is optim.OptimizerEntry
    assert opt_study.optimizer_entry("adamw") is optim.OPTIMIZERS["adamw"]
    f = spec_factory.write(tmp_path / "s.yaml")
    spec = opt_study.load_study(f)
    assert spec.study.name == "t" and spec.workload.params.dim == 4
    with StepWriter(spec.study_dir, "sgd-000-s0", 0, start_step=0) as w:
        for step in range(3):
            w.append({"step": step, "time_unix": 1.0, "loss": 3.0 - step})
    write_trial_record(spec.study_dir, {"trial_id": "sgd-000-s0", "status": "completed", "hparams": {"lr": 0.1}})
    res = opt_study.open_results(f)  # a YAML names its study folder
    assert res.study_dir == spec.study_dir == opt_study.open_results(spec.study_dir).study_dir
    assert res.steps()["loss"].to_pylist() == [3.0, 2.0, 1.0]
    assert res.trials()["hp.lr"].to_pylist() == [0.1]
    assert res.query("SELECT max(step) AS s FROM steps")["s"].to_pylist() == [2]
    assert res.replay().num_rows == 0
    with pytest.raises(AttributeError):
        opt_study.no_such_name  # noqa: B018


def test_the_custom_workload_example_validates(monkeypatch):
    """examples/custom_workload/study.yaml: all three plugins by import path, 2 workers at ZeRO-2,
    measured every 5 steps (what its README promises)."""
    from pathlib import Path

    from opt_study.plan.planners import plan_trials
    from opt_study.validate import load_study

    example = Path(__file__).resolve().parents[2] / "examples" / "custom_workload"
    monkeypatch.syspath_prepend(str(example))
    spec = load_study(example / "study.yaml")
    assert (spec.scale.workers, spec.scale.zero_stage, spec.measure.every) == (2, 2, 5)
    assert [line.split(": ", 1)[1] for line in imported_modules(spec)] == [
        "module byo_example.models",
        "module byo_example.opt",
        "module byo_example.metrics",
    ]
    assert [p.trial_id for p in plan_trials(spec)] == ["signum-000-s0", "signum-001-s0", "adamw-000-s0", "adamw-001-s0"]
    w = workloads.make_workload(spec.workload.type, spec.workload.params, 0)
    assert w.val[1].std().item() > 0.5  # the teacher's outputs are scaled to unit variance
