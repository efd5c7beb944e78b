"""The README quickstart (`opt-study run configs/quickstart.yaml`, then `opt-study report`), shrunk
to seconds and run for real into tmp_path: `run_study` as `opt-study run` calls it, on the
session's Ray (Ray Tune, DeepSpeed at ZeRO-2, Parquet, a SQLite MLflow store), then the `report`
command. The report of that study renders every section, is logged to MLflow, and its SQL
recomputes the recorder's per-trial summaries.

One rank per trial (the in-process launcher): a 2-rank worker group costs ~20-35 s of start-up per
trial on CI's 2 cores and the report reads the same rows; worker groups are test_e2e.py's."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from opt_study.cli.main import main
from opt_study.report import build, tables
from opt_study.report import data as rdata
from opt_study.study.run import run_study
from opt_study.validate import load_study

import specs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
SUMMARIES = ("frac_convexity_fwd_holds", "smoothness_ratio", "smoothness_local_median")


def test_report_of_the_quickstart_study(ray_cluster, tmp_path, capsys):
    # the shipped study with one rank, a smaller model, fewer steps and each grid's first learning rate
    f = specs.write_spec(
        tmp_path / "quickstart.yaml",
        tmp_path / "results",
        base=QUICKSTART,
        scale={"workers": 1, "cpus_per_worker": 1},
        workload={"layers": 1, "width": 32, "context": 16},
        training={"steps": 10, "eval_every": 5, "schedule": {"warmup_steps": 2}},
        optimizers=[
            {**o, "params": {**o["params"], "lr": o["params"]["lr"]["grid"][0]}} for o in QUICKSTART["optimizers"]
        ],
        measure={"every": 2},
    )
    spec = load_study(f)
    assert (spec.scale.zero_stage, spec.scale.resolved_launcher) == (2, "in_process")
    out = io.StringIO()  # not the CLI's sys.stdout: Tune pickles the stream, and pytest's capture cannot be
    assert run_study(spec, source_text=f.read_text(), out=out)["ran"] == 3
    assert out.getvalue().count("COMPLETED") == 3
    study = spec.study_dir
    assert main(["report", str(study)]) == 0
    assert f"report: {study / 'report' / 'index.html'}" in capsys.readouterr().out

    text = (study / "report" / "index.html").read_text()
    for sid, _title in build.SECTIONS:
        assert f'<section id="{sid}">' in text, sid
    assert "Logged as artifacts report/" in text
    d = rdata.load(study)
    try:
        assert sorted(t["label"] for t in d.trials.values()) == ["adamw", "momentum", "radam"]
        assert {t["status"] for t in d.trials.values()} == {"completed"}
        rows = tables.assumption_table(d)
        assert {r["label"] for r in rows} == {t["label"] for t in d.trials.values()}
        for tid, t in d.trials.items():  # the recorder's summaries, recomputed in SQL
            for k in SUMMARIES:
                assert t[k] is not None and t[k] == pytest.approx(t[f"summary.{k}"], rel=1e-12), (tid, k)
        assert sum(r["trials"] for r in tables.status_table(d)[:-1]) == len(d.trials) == 3
    finally:
        d.db.close()
