"""The report library on a synthetic study whose every number is known by construction (the
report of a real, freshly run quickstart study is tests/e2e/test_quickstart_report.py).

The synthetic study (``synth``, workload ``quadratic``): labels sgd and adam, two
configurations (index 0, 1) x seeds 0, 1 each, and lion (one failed trial without rows, one
pending trial of the plan). 20 steps per trial, measured every 2 steps, eval at steps 9 and 19.
Every number is a small power-of-two fraction, so the sums are exact in float64. On the nine
unflagged measured steps of every trial (the tenth, step 18, has a zero update):

- forward gaps (⟨g,Δ⟩ − δ): −1/8 ×3, −1/16 ×3, +1/16 ×2, 0 ×1 -> holds 6/9, violated 2/9,
  indeterminate 1/9 (0 is within the noise floor); backward gaps: −1/16 ×4, +1/16 ×4, 0 -> 4/9,
  4/9, 1/9; δ = −1/8 and ‖Δ‖² = 1/4, so the effective smoothness ratio is
  Σ(−gap_fwd)/(½·9/4) = (7/16)/(9/8) = 7/18;
- L_t = (k+1)/16 · (1+seed) · m (m = 1 sgd, 2 adam; k = 0..8) and ‖g_t‖ = (k+1)/2, so the
  median is 5/16·(1+seed)·m, L̂ = max = 9/16·(1+seed)·m, and the points lie on the lines
  L = ‖g‖·(1+seed)·m/8 (the 95% envelope of sgd is L0 = 0, L1 = 1/4);
- descent lemma with L̂: gap = −gap_fwd − L̂/8 and bound = −1/8 + gap_fwd + L̂/8, giving
  (holds, progress predicted) = (6/9, 7/9) for sgd seed 0, (1, 6/9) for sgd seed 1 and adam
  seed 0, (1, 0) for adam seed 1.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opt_study.measure.metrics import classify, derive, summarize
from opt_study.report import build, figures, stats, tables
from opt_study.report import data as rdata
from opt_study.results import trials as trials_tbl
from opt_study.results.mlflow_sink import MlflowSink
from opt_study.results.parquet import StepWriter, read_steps

ROOT = Path(__file__).resolve().parents[2]
T975_1 = 12.706204736174707  # Student t quantile 0.975 with 1 degree of freedom (tables)

GAP_FWD = [-1 / 8] * 3 + [-1 / 16] * 3 + [1 / 16] * 2 + [0.0]
GAP_BWD = [-1 / 16] * 4 + [1 / 16] * 4 + [0.0]
EVALS = {  # (label, index, seed) -> eval losses at steps 9 and 19 (None: none recorded)
    ("sgd", 0, 0): (1.25, 1.0),
    ("sgd", 0, 1): (1.6, 1.25),
    ("sgd", 1, 0): (1.4, 0.75),
    ("sgd", 1, 1): (1.7, 1.75),
    ("adam", 0, 0): (2.0, 1.5),
    ("adam", 0, 1): (2.0, 1.5),
    ("adam", 1, 0): (1.0, 0.5),
    ("adam", 1, 1): None,  # diverges at step 5
}
LR = {"sgd": (0.1, 0.3), "adam": (0.001, 0.01), "lion": (1e-4, 3e-4)}
STATUS = {("adam", 1, 1): "diverged", ("sgd", 1, 1): "running", ("lion", 0, 0): "failed"}


def _measured_row(k: int, seed: int, m: float) -> dict:
    """Measured step k (0..9) of a trial: sums as designed above, derived by ``derive``."""
    loss, delta = 2.0, -1 / 8
    if k == 9:  # a zero update: flagged, excluded from every statistic but n_flagged
        sums = {
            "sq_grad": 1.0,
            "sq_grad_probe": 1.0,
            "sq_update": 0.0,
            "sq_param": 100.0,
            "ip_grad_update": 0.0,
            "ip_probe_update": 0.0,
            "sq_grad_diff": 0.0,
        }
        return {**sums, "loss_probe": loss, "probe_s": 1.0, **derive(sums, loss, loss, 1.0)}
    L, g = (k + 1) / 16 * (1 + seed) * m, (k + 1) / 2
    sums = {
        "sq_grad": g * g,
        "sq_grad_probe": g * g,
        "sq_update": 0.25,
        "sq_param": 100.0,
        "ip_grad_update": delta + GAP_FWD[k],
        "ip_probe_update": delta - GAP_BWD[k],
        "sq_grad_diff": (L * 0.5) ** 2,
    }
    out = derive(sums, loss, loss + delta, 1.0)
    assert out["smoothness_local"] == L and out["flag"] is None
    return {**sums, "loss_probe": loss + delta, "probe_s": 1.0, **out}


def _write_trial(study: Path, label: str, index: int, seed: int) -> None:
    m = 1.0 if label == "sgd" else 2.0
    evals = EVALS[(label, index, seed)]
    last = 5 if evals is None else 19
    with StepWriter(study, f"{label}-{index:03d}-s{seed}", 0, 0, rows_per_chunk=10) as w:
        for step in range(last + 1):
            row = {"step": step, "loss": 2.0, "lr": LR[label][index], "time_unix": 1e9 + step}
            if step == last and evals is None:
                row["loss"] = math.nan
            elif step % 2 == 0:
                row.update(measured=True, **_measured_row(step // 2, seed, m))
            if evals is not None and step in (9, 19):
                row["eval_loss"] = evals[0 if step == 9 else 1]
            w.append(row)


def _record(label: str, index: int, seed: int) -> dict:
    return {
        "trial_id": f"{label}-{index:03d}-s{seed}",
        "study": "synth",
        "label": label,
        "optimizer": label,
        "workload": "quadratic",
        "seed": seed,
        "hparams": {"lr": LR[label][index]},
        "status": STATUS.get((label, index, seed), "completed"),
    }


def build_study(root: Path) -> Path:
    """The synthetic study under ``root`` (storage root), with an MLflow store beside it."""
    study = root / "synth"
    study.mkdir(parents=True)
    (study / "spec.yaml").write_text("study: {name: synth}\nworkload: {type: quadratic}\n")
    plan = []
    for label, n_idx, seeds in (("sgd", 2, (0, 1)), ("adam", 2, (0, 1)), ("lion", 2, (0,))):
        for index in range(n_idx):
            for seed in seeds:
                plan.append(
                    {
                        "trial_id": f"{label}-{index:03d}-s{seed}",
                        "label": label,
                        "optimizer": label,
                        "hparams": {"lr": LR[label][index]},
                        "seed": seed,
                        "index": index,
                    }
                )
                if label == "lion" and index == 1:
                    continue  # pending: in the plan only
                if label != "lion":
                    _write_trial(study, label, index, seed)
                rec = _record(label, index, seed)
                if rec["status"] == "failed":
                    rec["error"] = "Traceback ...\nRuntimeError: out of memory"
                trials_tbl.write_trial_record(study, rec)
    import json

    (study / "plan.json").write_text(json.dumps(plan))
    _log_mlflow(root, study)
    return study


def _log_mlflow(root: Path, study: Path) -> None:
    """The study's MLflow parent run (the report's artifacts go there); the trial runs are
    tested with the query layer (tests/unit/test_query.py)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    # An explicit artifact location: the default is ./mlruns of the current directory.
    MlflowClient(uri).create_experiment("opt_study/synth", artifact_location=str(root / "artifacts"))
    MlflowSink(uri, "opt_study/synth").parent_run("synth", {}, {})


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return build_study(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def sd(study):
    d = rdata.load(study, threads=2)
    yield d
    d.db.close()


# ------------------------------------------------------------------------------ tables


def test_status_counts_every_trial(sd):
    rows = {r["label"]: r for r in tables.status_table(sd)}
    assert rows["sgd"] == {
        "label": "sgd",
        "trials": 4,
        "pending": 0,
        "running": 1,
        "completed": 3,
        "stopped": 0,
        "diverged": 0,
        "failed": 0,
    }
    assert rows["adam"]["completed"] == 3 and rows["adam"]["diverged"] == 1
    assert (rows["lion"]["failed"], rows["lion"]["pending"], rows["lion"]["trials"]) == (1, 1, 2)
    assert rows["all"]["trials"] == 10 and sum(rows["all"][s] for s in rdata.STATUSES) == 10
    probs = {r["trial_id"]: r for r in tables.problem_trials(sd)}
    assert set(probs) == {"adam-001-s1", "lion-000-s0", "lion-001-s0", "sgd-001-s1"}
    assert probs["adam-001-s1"]["steps"] == 6 and probs["adam-001-s1"]["last_step"] == 5
    assert math.isnan(probs["adam-001-s1"]["final_loss"])
    assert probs["lion-000-s0"]["error"] == "RuntimeError: out of memory"


def test_best_configuration_per_label(sd):
    # sgd: lr 0.1 has mean best eval (1.0 + 1.25)/2 < lr 0.3's (0.75 + 1.7)/2; adam's lr 0.01
    # has a diverged seed (+inf); lion has no finite loss at all: the first in budget order.
    assert sd.best == {
        "sgd": ["sgd-000-s0", "sgd-000-s1"],
        "adam": ["adam-000-s0", "adam-000-s1"],
        "lion": ["lion-000-s0"],
    }


def test_trial_stats_equal_summarize(study, sd):
    """The SQL aggregates are the numbers of metrics.summarize on the same rows, and the
    descent-lemma classes those of metrics.classify with L̂ = the window's max L_t."""
    for tid in ("sgd-000-s0", "adam-001-s1", "sgd-001-s1", "adam-000-s1"):
        rows = [r for r in read_steps(study, [tid]).to_pylist() if r["measured"]]
        ref, got = summarize(rows), sd.trials[tid]
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, rel=1e-12, nan_ok=True), (tid, k)
        l_hat = ref["smoothness_local_max"]
        ok = [r for r in rows if not r["flag"]]
        cls = [
            classify(
                (r["loss_probe"] - r["loss"])
                - (r["probe_s"] * r["ip_grad_update"] + l_hat * (0.5 * r["probe_s"] * r["probe_s"] * r["sq_update"])),
                r["noise_floor"],
            )
            for r in ok
        ]
        for k in ("holds", "violated", "indeterminate"):
            assert got[f"frac_descent_{k}"] == cls.count(k) / len(cls), (tid, k)


def test_assumption_table_numbers(sd):
    rows = {r["label"]: r for r in tables.assumption_table(sd)}
    sgd, adam, lion = rows["sgd"], rows["adam"], rows["lion"]
    for r in (sgd, adam):
        assert (r["trials"], r["seeds"], r["n_measured"], r["n_flagged"]) == (2, 2, 20, 2)
        assert r["statuses"] == "completed:2"
        expect = {
            "fwd_holds": 6 / 9,
            "fwd_violated": 2 / 9,
            "fwd_indeterminate": 1 / 9,
            "bwd_holds": 4 / 9,
            "bwd_violated": 4 / 9,
            "bwd_indeterminate": 1 / 9,
        }
        for k, v in expect.items():
            assert r[f"frac_convexity_{k}"] == pytest.approx(v, rel=1e-15)
            assert r[f"frac_convexity_{k}_ci"] == 0.0
        assert r["smoothness_ratio"] == pytest.approx(7 / 18, rel=1e-15)
    assert sgd["config"] == "lr=0.1" and adam["config"] == "lr=0.001"
    assert sgd["smoothness_local_median"] == 15 / 32 and adam["smoothness_local_median"] == 30 / 32
    assert sgd["smoothness_local_max"] == 27 / 32 and adam["smoothness_local_max"] == 54 / 32
    # CI half-width over 2 seeds: t_{.975,1} * |a - b| / 2.
    assert sgd["smoothness_local_median_ci"] == pytest.approx(T975_1 * (10 - 5) / 16 / 2, rel=1e-12)
    assert sgd["frac_descent_holds"] == pytest.approx(5 / 6, rel=1e-15)
    assert sgd["frac_descent_holds_ci"] == pytest.approx(T975_1 * (3 / 9) / 2, rel=1e-12)
    assert sgd["frac_progress_predicted"] == pytest.approx(13 / 18, rel=1e-15)
    assert adam["frac_descent_holds"] == 1.0 and adam["frac_descent_holds_ci"] == 0.0
    assert adam["frac_progress_predicted"] == pytest.approx(1 / 3, rel=1e-15)
    assert adam["frac_progress_predicted_ci"] == pytest.approx(T975_1 * (6 / 9) / 2, rel=1e-12)
    # The failed label stays in the table, with no numbers and its status.
    assert lion["statuses"] == "failed:1" and lion["n_measured"] == 0
    assert math.isnan(lion["smoothness_ratio"]) and lion["smoothness_ratio_n"] == 0


def test_assumption_table_over_all_trials(sd):
    rows = {r["label"]: r for r in tables.assumption_table(sd, select="all")}
    # adam: 4 trials; the diverged one has 3 measured rows with L = 1/8, 2/8, 3/8 (seed 1, m=2).
    assert rows["adam"]["trials"] == 4 and rows["adam"]["n_measured"] == 33
    assert rows["adam"]["statuses"] == "completed:3, diverged:1"
    assert rows["lion"]["trials"] == 2 and rows["lion"]["statuses"] == "failed:1, pending:1"
    with pytest.raises(ValueError, match="select"):
        tables.assumption_table(sd, select="some")


def test_envelope_table(sd):
    rows = {r["label"]: r for r in tables.envelope_table(sd)}
    assert rows["sgd"]["n"] == 18 and rows["adam"]["n"] == 18
    assert rows["sgd"]["L0"] == pytest.approx(0.0, abs=1e-12)
    assert rows["sgd"]["L1"] == pytest.approx(1 / 4, rel=1e-9)
    assert rows["adam"]["L1"] == pytest.approx(1 / 2, rel=1e-9)
    assert math.isnan(rows["lion"]["L0"]) and rows["lion"]["n"] == 0


def test_crowded_valley_numbers(sd):
    assert tables.budget_values(sd) == {
        "sgd": {1: [1.0, 1.25], 2: [0.75, 1.25]},
        "adam": {1: [1.5, 1.5], 2: [0.5, 1.5]},
        "lion": {1: [math.inf], 2: [math.inf]},
    }
    rows = {r["label"]: r for r in tables.crowded_valley_table(sd)}
    assert rows["sgd"] == {
        "label": "sgd",
        "budget": 2,
        "seeds": 2,
        "median": 1.0,
        "min": 0.75,
        "max": 1.25,
        "no_result": 0,
        "trials_without_loss": 0,
    }
    assert (rows["adam"]["median"], rows["adam"]["trials_without_loss"]) == (1.0, 1)
    assert rows["lion"]["no_result"] == 1 and rows["lion"]["trials_without_loss"] == 2


def test_profile_table(sd):
    prof = tables.profile_table([sd])
    costs = {r["label"]: (r["target"], r["steps"]) for r in prof["rows"]}
    # Target: sgd's worst seed reached 1.25 (adam's only 1.5); both sgd seeds by step 19.
    assert costs == {"sgd": (1.25, 20.0), "adam": (1.25, math.inf), "lion": (1.25, math.inf)}
    assert prof["scores"] == {"adam": 0.0, "lion": 0.0, "sgd": 1.0}


def test_performance_profile_across_workloads():
    times = {
        "w1": {"a": 10, "b": 20},
        "w2": {"a": 30, "b": 15},
        "w3": {"a": math.inf, "b": 5},
        "w4": {"a": math.nan, "b": math.inf},
    }  # w4: nobody reached: ranks nobody
    rho = stats.performance_profile(times, [1.0, 1.5, 2.0, 4.0])
    assert rho["a"].tolist() == [1 / 3, 1 / 3, 2 / 3, 2 / 3]
    assert rho["b"].tolist() == [2 / 3, 2 / 3, 1.0, 1.0]
    assert stats.profile_score(rho["b"], [1.0, 1.5, 2.0, 4.0]) == pytest.approx(
        ((2 / 3 + 2 / 3) * 0.5 + (2 / 3 + 1) * 0.5 + 2 * 2) / 2 / 3
    )


def test_replay_table(sd):
    assert tables.replay_table(sd) == []  # no replay/ dataset


def test_mean_ci():
    assert stats.mean_ci([1.0, 3.0]) == pytest.approx((2.0, T975_1 * 1.0, 2))
    m, half, n = stats.mean_ci([5.0, math.nan, None, math.inf])
    assert (m, n) == (5.0, 1) and math.isnan(half)
    assert math.isnan(stats.mean_ci([])[0])


def test_quantile_envelope_is_the_constrained_quantile_regression():
    """Against the linear program solved by HiGHS (independent of the golden-section search)."""
    import numpy as np
    from scipy.optimize import linprog

    rng = np.random.default_rng(3)
    g = rng.uniform(0.1, 3.0, 150)
    for y, q in ((1.0 + 2.0 * g + rng.normal(0, 0.4, g.size), 0.9), (4.0 - g + rng.normal(0, 0.1, g.size), 0.95)):
        n = g.size
        c = np.r_[0.0, 0.0, q * np.ones(n), (1 - q) * np.ones(n)]
        lp = linprog(
            c,
            A_eq=np.c_[np.ones(n), g, np.eye(n), -np.eye(n)],
            b_eq=y,
            bounds=[(0, None)] * (2 + 2 * n),
            method="highs",
        )
        fit = stats.quantile_envelope(g, y, q=q)
        assert (fit["L0"], fit["L1"]) == pytest.approx(tuple(lp.x[:2]), abs=1e-7)
        assert fit["L0"] >= 0 and fit["L1"] >= 0
    with pytest.raises(ValueError):
        stats.quantile_envelope(g, g, q=1.0)


def test_best_so_far_and_budgets():
    assert stats.best_so_far([3.0, math.nan, 2.0, None, 5.0]) == [3.0, 3.0, 2.0, 2.0, 2.0]
    assert stats.best_so_far([math.inf, 1.0]) == [math.inf, 1.0]
    assert stats.budgets(5) == [1, 2, 4, 5] and stats.budgets(4) == [1, 2, 4] and stats.budgets(0) == []


# ------------------------------------------------------------------------------ figures


def _check_figure(fig):
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    png = buf.getvalue()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_every_figure_renders_with_labelled_axes(sd):
    figs = [
        figures.trajectory_figure(sd),
        figures.smoothness_figure(sd),
        figures.crowded_valley_figure(sd),
        figures.profile_figure(tables.profile_table([sd])),
        figures.loss_curves_figure(sd),
        figures.distribution_figure(sd),
        figures.sensitivity_figure(sd),
    ]
    for fig in figs:
        _check_figure(fig)
    traj = figures.trajectory_figure(sd)
    assert len(traj.axes) == 6
    # One line per label with measured data (lion has none), per panel.
    assert {ln.get_label() for ln in traj.axes[2].get_lines()} == {"sgd", "adam"}
    assert figures.replay_figure(sd) is None  # no replay dataset: no figure


def _write_replay(study: Path) -> None:
    rows = {
        "trial_id": ["sgd-000-s0"] * 6,
        "step": [0, 10, 19, 0, 10, 19],
        "reference": ["final"] * 3 + ["x0"] * 3,
        "ip_grad_dist": [0.5, 0.25, 0.0, -0.25, -0.5, 1.0],
        "loss_gap": [0.25, 0.125, 0.0, -0.5, -1.0, math.nan],
    }
    (study / "replay").mkdir()
    pq.write_table(pa.table(rows), study / "replay" / "part-0.parquet")


def test_replay_table_and_figure(study, tmp_path):
    study = Path(shutil.copytree(study, tmp_path / "synth", ignore=shutil.ignore_patterns("report")))
    _write_replay(study)
    d = rdata.load(study)
    try:
        rows = {r["reference"]: r for r in tables.replay_table(d)}
        assert rows["final"] == {
            "label": "sgd",
            "reference": "final",
            "snapshots": 3,
            "sum_num": 0.75,
            "sum_den": 0.375,
            "excess": 0.375,
            "ratio": 2.0,
            "predicted": ">= 1",
            "consistent": True,
        }
        # The NaN row is left out: 2 snapshots, Σnum = −0.75, Σden = −1.5.
        assert rows["x0"]["snapshots"] == 2 and rows["x0"]["ratio"] == 0.5
        assert rows["x0"]["predicted"] == "<= 1" and rows["x0"]["consistent"] is True
        assert rows["x0"]["excess"] == 0.75
        _check_figure(figures.replay_figure(d))
        path = build.write_report(study, mlflow=False)
        assert 'id="replay"' in path.read_text() and 'alt="replay"' in path.read_text()
    finally:
        d.db.close()


# ------------------------------------------------------------------------------ the page


def _sections_present(text: str) -> None:
    for sid, _title in build.SECTIONS:
        assert f'<section id="{sid}">' in text, sid


def test_write_report_logs_to_mlflow(study):
    from mlflow.tracking import MlflowClient

    path = build.write_report(study)
    assert path == study / "report" / "index.html"
    text = path.read_text()
    _sections_present(text)
    # one self-contained page: every figure is inside it, none is a file beside it
    assert text.count('src="data:image/png;base64,') == 6 and not list((study / "report").glob("*.png"))
    assert "(no rows)" not in text and " 1 trials" not in text
    assert "No replay/ dataset" in text and "still running" in text
    assert "adam-001-s1" in text and "RuntimeError: out of memory" in text
    client = MlflowClient(f"sqlite:///{study.parent / 'mlflow.db'}")
    parent = client.search_runs(
        [client.get_experiment_by_name("opt_study/synth").experiment_id], "tags.`opt_study.role` = 'parent'"
    )[0]
    assert parent.info.run_id in text
    logged = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"index.html"}


def test_report_command(study, capsys):
    from opt_study.cli.main import main

    assert main(["report", str(study), "--out", str(study / "r2"), "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert f"report: {study / 'r2' / 'index.html'}" in out and f"opt-study ui {study}" in out
    assert main(["report", str(study / "nope")]) == 2


def test_report_of_a_study_that_has_not_started(tmp_path):
    """Only the spec and the plan: every section renders, every trial is counted as pending."""
    study = tmp_path / "fresh"
    study.mkdir()
    (study / "spec.yaml").write_text("study: {name: fresh}\nworkload: {type: quadratic}\n")
    (study / "plan.json").write_text(
        '[{"trial_id": "sgd-000-s0", "label": "sgd", "optimizer": "sgd", "hparams": {"lr": 0.1},'
        ' "seed": 0, "index": 0}]'
    )
    text = build.write_report(study).read_text()
    _sections_present(text)
    assert "MLflow: no tracking store found" in text and "still running" in text
    d = rdata.load(study)
    try:
        assert tables.status_table(d)[-1]["pending"] == 1
        for fig in (
            figures.trajectory_figure(d),
            figures.smoothness_figure(d),
            figures.crowded_valley_figure(d),
            figures.loss_curves_figure(d),
        ):
            _check_figure(fig)
    finally:
        d.db.close()


def test_analysis_recipes_run(study, tmp_path, monkeypatch, capsys):
    """Each recipe runs as a script (``runpy`` as ``__main__``, in this process to save the
    interpreter start-up) and writes its figures and table."""
    import runpy

    for script, args in (("assumption_tables.py", [str(study)]), ("crowded_valley.py", [str(study), str(study)])):
        out = tmp_path / script
        monkeypatch.setattr("sys.argv", [script, *args, "--out", str(out)])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "analysis" / script), run_name="__main__")
        assert done.value.code == 0
        assert any(p.suffix == ".png" and p.stat().st_size > 2000 for p in out.iterdir())
    text = capsys.readouterr().out
    assert "Assumption table" in text and "Performance-profile scores" in text
    assert (tmp_path / "assumption_tables.py" / "assumption_table.csv").read_text().startswith("label,")
