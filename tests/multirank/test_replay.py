"""Checkpoint replay (docs/METRICS.md §Reference-point metrics): snapshots, the replay job, its
Parquet rows, the Hessian estimates and the CLI.

The multi-rank part is ONE torchrun job at world 2 (tests/dist/replay_harness.py) looping over
ZeRO stages 0-3 and two workloads: a real trial saves snapshots, `replay_rank` replays it, and
rank 0 checks every stored value against a float64 single-process oracle computed from the same
snapshots (reassembled from the rank files in the test only). Tolerances (docs/METRICS.md
§Correctness contract): teacher-forced sums (the engine's own reduced gradient, gathered through DeepSpeed's
safe_get_full_grad) to 1e-6 of their scale; values that include the fp32 forward/backward
against the float64 model to 1e-5 (as tests/multirank/test_multirank.py's *_vs_fp64).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from opt_study.config import FieldError, MeasureConfig
from opt_study.measure import curvature
from opt_study.replay.job import HessianOptions
from opt_study.results import replay_store
from opt_study.storage import layout
from opt_study.trial import snapshots

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6
TOL_FP64 = 1e-5
TOL_LAMBDA = 2e-3  # finite-difference Hessian (ε = 3e-5‖x‖, fp32 gradients) + Lanczos; measured ≤ 3.2e-4
MAX_SIGMAS = 5.0  # Hutchinson is random: |estimate − trace| in units of its exact standard deviation

NO_PERSIST = {"stage3_param_persistence_threshold": 0}  # ZeRO-3 really partitions the tiny model
CASES = [
    {"stage": 0, "workload": "mlp", "steps": 4, "every": 3, "reference": "final"},
    {
        "stage": 1,
        "workload": "mlp",
        "steps": 2,
        "every": 2,
        "reference": "init",
        "val_fraction": 0.05,
        "hessian": {"lanczos_steps": 16, "hutchinson_samples": 6},
    },
    {"stage": 2, "workload": "mlp", "steps": 4, "every": 2, "reference": "2"},
    {"stage": 3, "workload": "mlp", "steps": 2, "every": 1, "reference": "final"},
    {"stage": 3, "workload": "mlp", "steps": 2, "every": 2, "reference": "final", "ds_extra": NO_PERSIST},
    {
        "stage": 2,
        "workload": "quadratic",
        "steps": 2,
        "every": 2,
        "reference": "init",
        "mbs": 64,
        "hessian": {"lanczos_steps": 18, "hutchinson_samples": 6},
    },
    # the training objective (replay --objective train): with dropout, and without (float64 oracle)
    {"stage": 2, "workload": "mlp", "steps": 4, "every": 2, "reference": "final", "objective": "train"},
    {
        "stage": 3,
        "workload": "quadratic",
        "steps": 3,
        "every": 1,
        "reference": "init",
        "objective": "train",
        "accum": 2,
        "mbs": 16,
    },
]
EXPECTED_STEPS = [[0, 3, 4], [0, 2], [0, 2, 4], [0, 1, 2], [0, 2], [0, 2], [0, 2, 4], [0, 1, 2, 3]]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    return env


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    from opt_study.distributed import free_port

    tmp = tmp_path_factory.mktemp("replay")
    out, storage = tmp / "out.json", tmp / "studies"
    storage.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "dist" / "replay_harness.py"),
        str(out),
        json.dumps(CASES),
        str(storage),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    return data, storage


# ------------------------------------------------------------------------ multi-rank (slow)
@pytest.mark.slow
def test_replay_matches_float64_oracle_at_every_stage(replayed):
    data, _ = replayed
    assert data["world"] == 2 and len(data["results"]) == len(CASES)
    for r, steps in zip(data["results"], EXPECTED_STEPS):
        case = r["case"]
        assert "error" not in r, f"{case}: {r.get('tb', r.get('error'))}"
        assert r["steps"] == steps, case  # x_0, every k-th iterate and the last one
        assert r["n_rows"] == len(steps) and r["stored_equals_returned"], case
        errs = r["errors"]
        if case.get("objective") == "train":
            _check_train_errors(case, r)
            continue
        must = {
            "snapshot_vs_trained_params",
            "tf_ip_grad_dist",
            "tf_sq_grad",
            "tf_sq_dist",
            "fp64_loss_x",
            "fp64_loss_y",
            "fp64_loss_gap",
            "fp64_ip_grad_dist",
            "fp64_grad",
            "final_eval_loss",
        }
        if case.get("hessian"):
            must |= {"hessian_lambda_max", "hutchinson_sigmas"}
        assert must <= set(errs), f"{case}: unchecked {sorted(must - set(errs))}"
        assert errs["snapshot_vs_trained_params"] == 0.0, case  # snapshots are the fp32 masters, exactly
        assert errs["final_eval_loss"] <= 1e-12, case  # F(x_final) is the trial's own last eval_loss
        for k, e in errs.items():
            limit = {"hessian_lambda_max": TOL_LAMBDA, "hutchinson_sigmas": MAX_SIGMAS, "final_eval_loss": 1e-12}.get(
                k, TOL_FP64 if k.startswith("fp64_") else TOL
            )
            assert e <= limit, f"{case}: {k} error {e:.2e} > {limit:.0e}"


def _check_train_errors(case: dict, r: dict) -> None:
    errs = r["errors"]
    must = {"snapshot_vs_trained_params", "tf_ip_grad_dist", "tf_sq_grad", "trial_train_loss"}
    if case["workload"] == "quadratic":
        must |= {"fp64_loss_x", "fp64_loss_y", "fp64_ip_grad_dist", "fp64_grad"}
    assert must <= set(errs), f"{case}: unchecked {sorted(must - set(errs))}"
    assert r["stored_objective"] == ["train"], case
    assert errs["snapshot_vs_trained_params"] == 0.0, case
    # f(x_e; B_e) is the trial's own training loss at step e: same weights, batch and masks
    assert errs["trial_train_loss"] <= 1e-12, f"{case}: {errs['trial_train_loss']:.2e}"  # measured: 0.0
    for k, e in errs.items():
        assert e <= (TOL_FP64 if k.startswith("fp64_") else TOL), f"{case}: {k} error {e:.2e}"


@pytest.mark.slow
def test_rows_at_the_reference_are_exactly_zero_and_columns_complete(replayed):
    data, _ = replayed
    for r in data["results"]:
        ref = [row for row in r["rows"] if row["step"] == row["ref_step"]]
        assert len(ref) == 1, r["case"]
        assert ref[0]["loss_gap"] == 0.0 and ref[0]["ip_grad_dist"] == 0.0 and ref[0]["sq_dist"] == 0.0
        for row in r["rows"]:
            assert row["world"] == 2 and row["zero_stage"] == r["case"]["stage"]
            assert row["sq_grad"] > 0 and row["loss_x"] > 0
            assert (row.get("hessian_top") is not None) == bool(r["case"].get("hessian"))
            if row.get("hessian_top"):
                top = row["hessian_top"]
                assert len(top) == 3 and top == sorted(top, reverse=True)
                assert row["hutchinson_samples"] == 6 and row["hutchinson_stderr"] > 0


@pytest.mark.slow
def test_cli_replay_launches_torchrun_and_reproduces_the_rows(replayed):
    """`opt-study replay STUDY --trial t0`: a fresh torchrun job at the trial's world size gives
    the same rows the in-harness replay gave (CPU, deterministic), time stamps aside."""
    from opt_study.cli.main import main

    data, storage = replayed
    study = storage / "r0"
    path = layout.replay_path(study, "t0", "final")
    path.unlink()
    assert main(["replay", str(study), "--trial", "t0"]) == 0
    rows = replay_store.read_replay(study, "t0", "final").to_pylist()
    want = data["results"][0]["rows"]
    assert [{k: v for k, v in r.items() if k != "time_unix" and k in w} for r, w in zip(rows, want)] == [
        {k: v for k, v in w.items() if k != "time_unix"} for w in want
    ]


@pytest.mark.slow
def test_cli_bad_input_exits_2_without_starting(replayed, capsys):
    from opt_study.cli.main import main

    _, storage = replayed
    for args, msg in (
        (["--reference", "7"], "no snapshot at step 7"),
        (["--reference", "best"], "reference must be"),
        (["--trial", "nope"], "no committed snapshots"),
        (["--hessian", "--top", "99"], "top"),
    ):
        assert main(["replay", str(storage / "r0"), *args]) == 2, args
        assert msg in capsys.readouterr().err, args


@pytest.mark.slow
def test_uncommitted_snapshots_are_ignored_and_files_load_weights_only(replayed, tmp_path):
    _, storage = replayed
    study = tmp_path / "r2"
    shutil.copytree(storage / "r2", study)
    assert snapshots.committed_steps(study, "t2") == [0, 2, 4]
    (layout.snapshot_step_dir(study, "t2", 4) / snapshots.COMMITTED).unlink()  # a save cut short
    assert snapshots.committed_steps(study, "t2") == [0, 2]
    assert snapshots.resolve_reference(study, "t2", "final") == 2
    assert snapshots.snapshot_trials(study) == ["t2"]
    meta = snapshots.read_meta(study, "t2", 2)
    assert meta["world"] == 2 and meta["zero_stage"] == 2 and len(meta["bounds"]) == 2
    # a rank file that would run code on load is refused (torch.load weights_only=True)
    evil = layout.snapshot_rank_file(study, "t2", 2, 0, 2)
    torch.save({"bounds": torch.zeros(1), "fragments": _Evil()}, evil)
    with pytest.raises(ValueError, match="the weights-only load refuses it"):
        snapshots.load_fragments(study, "t2", 2, 0, 2)


def test_cli_replay_never_runs_a_planted_pickle(replayed, tmp_path, capfd):
    """`opt-study replay` over a study whose snapshot file was replaced by a pickle that would
    create a file when unpickled: the job fails with the weights-only refusal, and no file."""
    from opt_study.cli.main import main

    _, storage = replayed
    study = tmp_path / "r0"
    shutil.copytree(storage / "r0", study)
    step = snapshots.resolve_reference(study, "t0", "final")
    world = snapshots.read_meta(study, "t0", step)["world"]
    canary = tmp_path / "canary"
    torch.save(
        {"bounds": torch.zeros(1), "fragments": _Touch(canary)}, layout.snapshot_rank_file(study, "t0", step, 0, world)
    )
    stored = layout.replay_path(study, "t0", "final")
    before = stored.read_bytes() if stored.exists() else None
    assert main(["replay", str(study), "--trial", "t0"]) != 0
    assert not canary.exists()
    assert "the weights-only load refuses it" in capfd.readouterr().err
    assert (stored.read_bytes() if stored.exists() else None) == before  # nothing replaced


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ------------------------------------------------------------------------------ single process
def _sym(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1.0, 5.0, n, dtype=torch.float64)
    return (q * lam) @ q.T, lam


def test_lanczos_finds_the_spectrum_of_an_explicit_matrix():
    a, lam = _sym(12)
    v0 = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ritz, k = curvature.lanczos(lambda v: a @ v, v0, 12, lambda t: t)
    assert k == 12
    np.testing.assert_allclose(np.sort(ritz), lam.numpy(), atol=1e-10)
    top, _ = curvature.lanczos(lambda v: a @ v, v0, 6, lambda t: t)
    assert top[0] <= 5.0 + 1e-12 and top[0] > 4.0  # Ritz values lie inside the spectrum


def test_lanczos_stops_when_the_krylov_space_is_invariant():
    a = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    ritz, k = curvature.lanczos(lambda v: a @ v, torch.ones(4, dtype=torch.float64), 4, lambda t: t)
    assert k == 2 and np.allclose(ritz, [3.0, 1.0])


def test_fd_hvp_is_exact_on_a_quadratic_and_hutchinson_is_unbiased():
    a, _ = _sym(40, seed=3)
    x = torch.randn(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-2
    hvp = curvature.fd_hvp(lambda p: a @ (p.double() - 1.0), x, eps)
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        v = torch.randn(40, generator=g, dtype=torch.float64)
        got = hvp(v)
        # On a quadratic the central difference is exact; what is left is the fp32 rounding of
        # the two points x ± εv: each coordinate moves by at most u·|x ± εv| (u = 2^-24), and
        # the difference quotient maps that through A and divides by 2ε.
        plus, minus = (x + eps * v).float().double(), (x - eps * v).float().double()
        assert torch.allclose(got, a @ (plus - minus) / (2 * eps), rtol=0, atol=1e-12)
        u = 2.0**-24
        bound = a.abs() @ (u * ((x + eps * v).abs() + (x - eps * v).abs())) / (2 * eps)
        err = (got - a @ v).abs()
        assert bool((err <= bound).all()) and float(err.max()) > 0  # rounding only, and some
    g = torch.Generator().manual_seed(5)
    probes = [torch.randint(0, 2, (40,), generator=g).double() * 2 - 1 for _ in range(400)]
    mean, se = curvature.hutchinson(lambda u: a @ u, probes, lambda t: t)
    exact_sd = math.sqrt(2 * (float((a * a).sum()) - float((a.diagonal() ** 2).sum())) / 400)
    assert abs(mean - float(a.trace())) <= MAX_SIGMAS * exact_sd
    assert 0.5 * exact_sd < se < 2 * exact_sd


def test_options_validate_with_field_errors():
    for kw, field in (
        ({"lanczos_steps": 0}, "lanczos_steps"),
        ({"top": 30}, "top"),
        ({"hutchinson_samples": -1}, "hutchinson_samples"),
        ({"fd_eps": 0.0}, "fd_eps"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(FieldError) as e:
            HessianOptions(**kw)
        assert e.value.field == field
    for bad in (-1, True, 1.5):
        with pytest.raises(FieldError) as e:
            MeasureConfig(snapshot_every=bad)
        assert e.value.field == "snapshot_every"
    assert MeasureConfig(snapshot_every=5).snapshot_every == 5


def test_replay_store_roundtrip_and_refusals(tmp_path):
    rows = [
        {
            "step": s,
            "ref_step": 4,
            "loss_x": 1.0 + s,
            "loss_y": 1.0,
            "ip_grad_dist": 0.5 * s,
            "loss_gap": float(s),
            "sq_dist": 2.0,
            "sq_grad": 3.0,
            "world": 2,
            "zero_stage": 3,
            "hessian_top": [2.0, 1.0] if s else None,
        }
        for s in (4, 0, 2)
    ]
    path = replay_store.write_replay(tmp_path, "a-1", "final", rows)
    assert path == tmp_path / "replay" / "trial_id=a-1" / "reference=final.parquet"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    replay_store.write_replay(tmp_path, "a-1", "3", rows[:1])
    got = replay_store.read_replay(tmp_path).to_pylist()
    assert [(r["reference"], r["step"]) for r in got] == [("3", 4), ("final", 0), ("final", 2), ("final", 4)]
    assert got[1]["hessian_top"] is None and got[3]["hessian_top"] == [2.0, 1.0]
    assert replay_store.read_replay(tmp_path, "a-1", "3").num_rows == 1
    assert replay_store.read_replay(tmp_path, "zz").num_rows == 0
    with pytest.raises(ValueError, match="unknown replay columns"):
        replay_store.write_replay(tmp_path, "a-1", "final", [{"step": 0, "ref_step": 0, "bogus": 1}])
    for bad in ("best", "-1", "../x"):
        with pytest.raises(ValueError):
            layout.replay_path(tmp_path, "a-1", bad)
    with pytest.raises(ValueError):
        layout.replay_path(tmp_path, "../a", "final")
    # the training objective: its own file beside the evaluation set's, told apart on read
    train = replay_store.write_replay(tmp_path, "a-1", "final", rows[:2], objective="train")
    assert train.name == "reference=final.objective=train.parquet"
    got = replay_store.read_replay(tmp_path, "a-1", "final").to_pylist()
    assert [(r["objective"], r["step"]) for r in got] == [
        ("eval", 0),
        ("eval", 2),
        ("eval", 4),
        ("train", 0),
        ("train", 4),
    ]
    assert replay_store.read_replay(tmp_path, objective="train").num_rows == 2
    assert replay_store.read_replay(tmp_path, "a-1", "3", objective="train").num_rows == 0
    with pytest.raises(ValueError, match="objective must be eval or train"):
        layout.replay_path(tmp_path, "a-1", "final", "test")
    # a file written before the objective column existed reads as the evaluation set's
    old = pq.read_table(path).drop_columns(["objective"])
    pq.write_table(old, path)
    got = replay_store.read_replay(tmp_path, "a-1", "final", objective="eval").to_pylist()
    assert [(r["objective"], r["step"]) for r in got] == [("eval", 0), ("eval", 2), ("eval", 4)]
