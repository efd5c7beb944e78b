"""The measurement's names cannot drift: opt_study.measure.names against every place that uses
them (the sums and their operands, the fused C++ kernel, the derived-metric formulas, the float64
reference, the Parquet schema, the SQL group view, the step hook's rows, the per-trial summary and
the multi-rank harness's checks)."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from opt_study.config import MeasureConfig
from opt_study.measure import fused_sums, metrics, names, sums
from opt_study.measure.cadence import Cadence
from opt_study.measure.hook import StepMeasurer
from opt_study.measure.reference import reference_metrics, reference_sums, reference_tensor_norms
from opt_study.results import schema

ROOT = Path(__file__).resolve().parents[2]
CPP = (ROOT / "opt_study" / "measure" / "csrc" / "fused_sums.cpp").read_text()
_CPP_BITS = {"G": "g", "D": "delta", "GP": "g_plus", "X0": "x0", "DP": "delta_prev", "GPR": "g_prev"}


def _vectors(terms: tuple[str, str]) -> set[str]:
    """The vectors a sum's operands read (differences expanded)."""
    return {v for t in terms for v in names.operand_vectors(t)}


def _random(n: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, generator=gen, dtype=torch.float64) for k in names.VECTOR_NAMES}


# ------------------------------------------------------------------------------------ raw sums
def test_sum_names_have_operands_and_a_reference_line():
    assert names.SUM_NAMES == tuple(names.SUM_TERMS) == sums.SUM_NAMES
    assert names.VECTOR_NAMES == tuple(f.name for f in fields(sums.Fragment) if f.name != "group")
    for d, (a, b) in names.SUM_DIFFS.items():
        assert {a, b} <= set(names.VECTOR_NAMES), d
    for name, terms in names.SUM_TERMS.items():
        assert _vectors(terms) <= set(names.VECTOR_NAMES), name
    v = _random()
    ref = reference_sums(v["x"], v["g"], v["delta"], v["g_plus"], v["x0"], v["delta_prev"], v["g_prev"])
    assert tuple(ref) == names.SUM_NAMES
    # the operand table IS the definition: each sum is the dot of its two operands
    ops = {**v, **{d: v[a] - v[b] for d, (a, b) in names.SUM_DIFFS.items()}}
    ops.update({m: v[k].abs() for m, k in names.SUM_ABS.items()})
    for name, (a, b) in names.SUM_TERMS.items():
        assert ref[name] == pytest.approx(float(ops[a] @ ops[b]), rel=1e-12), name
    assert set(names.NORM_SUMS) | set(names.PREV_OF) | set(names.PREV_OF.values()) <= set(names.SUM_NAMES)


def test_the_fused_kernel_computes_the_same_columns():
    """csrc/fused_sums.cpp: N_SUMS, N_VECS, the column order (enum Sum) and which vectors each
    column reads (has()) equal names.py; its presence bits equal fused_sums._BITS."""
    n_sums = int(re.search(r"constexpr int N_SUMS = (\d+);", CPP).group(1))
    n_vecs = int(re.search(r"constexpr int N_VECS = (\d+);", CPP).group(1))
    assert (n_sums, n_vecs) == (len(names.SUM_NAMES), len(names.VECTOR_NAMES))
    enum = re.search(r"enum Sum : int \{(.*?)\};", CPP, re.S).group(1)
    assert tuple(e.strip().lower() for e in enum.split(",") if e.strip()) == names.SUM_NAMES
    bits = dict(re.findall(r"\b(G|D|GP|X0|DP|GPR) = (\d+)", CPP))
    assert {_CPP_BITS[k]: int(b) for k, b in bits.items()} == fused_sums._BITS
    assert tuple(fused_sums._BITS) == names.VECTOR_NAMES[1:]  # x is always read
    cases = dict(re.findall(r"case (\w+): return (.*?);", CPP))
    for name, terms in names.SUM_TERMS.items():
        reads = {_CPP_BITS[t] for t in re.findall(r"\b(G|D|GP|X0|DP|GPR)\b", cases[name.upper()])}
        assert reads == _vectors(terms) - {"x"}, name
    if fused_sums.available():  # the built kernel's own layout answer (checked at load)
        assert fused_sums.error() is None


def test_loss_names_are_what_pack_carries():
    packed = sums.pack(
        torch.zeros(len(names.SUM_NAMES), 2, dtype=torch.float64),
        torch.arange(len(names.LOSS_NAMES), dtype=torch.float64),
    )
    _, scalars = sums.unpack(packed, 2)
    assert tuple(scalars) == names.LOSS_NAMES


# ------------------------------------------------------------------------------ derived metrics
def test_every_derived_name_has_a_formula_a_reference_and_a_value():
    v = _random(seed=1)
    ref_sums = reference_sums(v["x"], v["g"], v["delta"], v["g_plus"], v["x0"], v["delta_prev"], v["g_prev"])
    ref_sums.update(reference_tensor_norms(v["g"], v["g_plus"], v["delta"], [20, 30]))  # two tensors
    got = metrics.derive(ref_sums, 1.0, 1.5, 0.7)
    ref = reference_metrics(
        v["x"],
        v["g"],
        v["delta"],
        v["g_plus"],
        1.0,
        1.5,
        0.7,
        delta_prev=v["delta_prev"],
        g_prev=v["g_prev"],
        sizes=[20, 30],
    )
    assert tuple(got) == names.OUTPUT_NAMES
    assert set(ref) == set(names.OUTPUT_NAMES)
    for k in names.DERIVED_NAMES:  # a real number on generic inputs: no formula left as a stub
        assert isinstance(got[k], float) and math.isfinite(got[k]), k
        assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    for k in names.CLASS_NAMES:
        assert got[k] in names.CLASSES
    assert set(metrics.group_metrics(ref_sums)) <= set(names.DERIVED_NAMES)
    assert (
        tuple(metrics.summarize([{**ref_sums, **got, "loss": 1.0, "loss_probe": 1.5, "probe_s": 0.7}]))
        == names.SUMMARY_NAMES
    )


# ------------------------------------------------------------------------------- the schema
def test_schema_columns_come_from_names():
    assert schema.RAW_SUM_COLUMNS == names.RAW_NAMES
    assert schema.GROUP_SUM_COLUMNS == names.SUM_NAMES
    assert schema.DERIVED_COLUMNS == names.ROW_DERIVED_NAMES
    assert schema.CLASS_COLUMNS == (*names.CLASS_NAMES, names.NEXT_BATCH_CLASS)
    assert schema.CLASS_VALUES == set(names.CLASSES)
    float_names = (
        *names.NORM_NAMES,
        *names.RAW_NAMES,
        *names.ROW_DERIVED_NAMES,
        *(n for n in names.DERIVED_NAMES if n not in names.NORM_NAMES),
    )
    for n in float_names:
        assert schema.STEP_SCHEMA.field(n).type == pa.float64(), n
    for n in (*names.CLASS_NAMES, names.FLAG, names.LOSS_PRECISION, names.CURVATURE_BATCH):
        assert schema.STEP_SCHEMA.field(n).type == pa.string(), n
    group = schema.STEP_SCHEMA.field(names.GROUPS).type.value_type
    assert [f.name for f in group] == ["name", *names.SUM_NAMES]
    assert schema.STEP_SCHEMA.field(names.MEASURED).type == pa.bool_()


def test_query_groups_view_lists_every_group_sum(tmp_path):
    from opt_study.results.query import open_study

    db = open_study(tmp_path)
    cols = [d[0] for d in db.con.execute("DESCRIBE groups").fetchall()]
    assert cols == ["trial_id", "step", "group_name", *names.SUM_NAMES]


# -------------------------------------------------------------------- the hook's rows and harness
class _Engine:
    """Just enough of a one-process ZeRO-0 fp32 DeepSpeed engine for StepMeasurer."""

    def __init__(self, model: torch.nn.Module):
        self.module, self.device = model, torch.device("cpu")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def gradient_accumulation_steps(self) -> int:
        return 1

    def zero_optimization_stage(self) -> int:
        return 0

    def set_gradient_accumulation_boundary(self, value) -> None:
        pass

    def backward(self, loss) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def step(self) -> None:
        self.optimizer.step()
        self.zero_grad()


def measured_rows(steps: int = 3, every: int = 1) -> list[dict]:
    """Rows of a real StepMeasurer over a tiny linear model (one process, no DeepSpeed)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    eng = _Engine(model)
    info = SimpleNamespace(zero_stage=0, rank=0, world_size=1)
    m = StepMeasurer(
        eng,
        info,
        MeasureConfig(every=every, noise_scale=True),
        "fp32",
        Cadence(steps=steps, eval_every=steps, measure_every=every),
    )
    loss_fn = lambda b: ((eng.module(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    rows = []
    for t in range(steps):
        batch = (torch.randn(8, 3), torch.randn(8, 1))
        m.begin(t)
        m.before_micro(batch)
        loss = loss_fn(batch)
        eng.backward(loss)
        m.at_boundary()
        eng.step()
        rows.append(m.end(t, loss.detach().double(), loss_fn))
    return rows


def test_hook_rows_are_schema_rows():
    rows = measured_rows()
    assert [r[names.MEASURED] for r in rows] == [True, True, True]
    for r in rows:
        schema.check_keys(r)  # every key is a column
        want = {
            "loss",
            *names.NORM_NAMES,
            names.MEASURED,
            names.LOSS_PRECISION,
            names.GRAD_PRECISION,
            *names.RAW_NAMES,
            *names.ROW_DERIVED_NAMES,
            *names.CLASS_NAMES,
            names.FLAG,
            names.GROUPS,
            *names.NEXT_BATCH_NAMES,  # null without measure.next_batch
            names.NEXT_BATCH_CLASS,
            *names.GRAD_HISTORY_NAMES,  # null without measure.grad_history
        }
        assert set(r) == want
        assert all(set(g) == set(names.SUM_NAMES) for g in r[names.GROUPS].values())
    assert rows[-1]["sq_update_prev"] is not None and math.isfinite(rows[-1]["cos_update_prev"])


def test_harness_checks_every_sum_and_metric():
    """tests/dist/harness.py compares every raw sum (its SUM_OPERANDS) and loops over
    names.DERIVED_NAMES, so a new name is checked at every measured step of the multi-rank runs."""
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    try:
        import harness
    finally:
        sys.path.remove(str(ROOT / "tests" / "dist"))
    assert set(harness.SUM_OPERANDS) == set(names.SUM_NAMES)
    for name, terms in harness.SUM_OPERANDS.items():
        assert _vectors(terms) == _vectors(names.SUM_TERMS[name]), name
    src = (ROOT / "tests" / "dist" / "harness.py").read_text()
    assert "for k in names.DERIVED_NAMES:" in src and "for name in names.SUM_NAMES:" in src
