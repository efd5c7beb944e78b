"""The study spec: every rule of every slice names its dotted field, good specs build with the
documented defaults, every shipped config loads, and the hostile corpus in tests/bad_configs/
fails with the field its first line names (`# expect: <field>`, `<top>` for the whole file)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from opt_study.config import MAX_CONFIG_BYTES, ConfigError, FieldError, ScaleConfig, Spec, StudyConfig, TrainingConfig
from opt_study.config.space import Domain
from opt_study.plan.planners import check_trial_ids
from opt_study.validate import check_runnable, load_study, parse_study
from opt_study.workloads import MLPClassifyConfig, QuadraticConfig, TinyLMConfig

from corpus import CORPUS, expected_field, generated_bad_files

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
GOOD = {
    "study": {"name": "t"},
    "workload": {"type": "quadratic"},
    "optimizers": [{"name": "sgd", "params": {"lr": 0.1}}],
}


def spec(**patch) -> Spec:
    """GOOD with whole top-level slices replaced by `patch`."""
    data = copy.deepcopy(GOOD)
    data.update(patch)
    return parse_study(data, "mem.yaml")


def runnable(s: Spec) -> Spec:
    """What `opt-study validate` adds for a study that is to run: storage, data, trial ids."""
    check_runnable(s)
    check_trial_ids(s)
    return s


def rejects(field: str, **patch) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        spec(**patch)
    assert (ei.value.field, ei.value.file) == (field, "mem.yaml"), str(ei.value)
    assert str(ei.value).startswith(f"mem.yaml: {field or '<top>'}: ")
    return ei.value


# ------------------------------------------------------------------------------ good specs, defaults
def test_minimal_spec_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = spec()
    assert s.study == StudyConfig(name="t", seeds=(0,), storage=str(tmp_path.resolve() / "results"))
    assert s.scale == ScaleConfig() and s.scale.resolved_launcher == "in_process"
    assert (
        s.scale.workers,
        s.scale.gpus_per_worker,
        s.scale.cpus_per_worker,
        s.scale.zero_stage,
        s.scale.precision,
        s.scale.micro_batch_size,
        s.scale.grad_accum,
        s.scale.torch_threads,
    ) == (1, 0, 1.0, 0, "fp32", 8, 1, 1)
    t = s.training
    assert (t.steps, t.eval_every, t.grad_clip, t.log_every) == (100, 50, None, 1)
    assert (t.schedule.type, t.schedule.warmup_steps, t.schedule.min_ratio) == ("constant", 0, 0.0)
    assert (s.search.samples, s.search.seed, s.search.asha, s.search.max_concurrent_trials) == (1, 0, None, None)
    assert (s.measure.every, s.measure.probe_s, s.measure.norms) == (0, "1", True)
    assert s.workload.type == "quadratic" and s.workload.params == QuadraticConfig()
    (o,) = s.optimizers
    assert (o.name, o.label, dict(o.space)) == ("sgd", "sgd", {"lr": Domain("fixed", (0.1,))})
    assert s.source == "mem.yaml"


def test_storage_is_absolute_and_tracking_uri_defaults_under_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = spec(study={"name": "t", "storage": "out/../runs"})
    root = tmp_path.resolve() / "runs"
    assert s.study.storage == str(root) and Path(s.study.storage).is_absolute()
    assert s.storage_root == root and s.study_dir == root / "t"
    assert s.tracking_uri == f"sqlite:///{root}/mlflow.db"
    monkeypatch.chdir("/")  # a Ray worker's working directory: the resolved root must not move
    assert s.storage_root == root
    assert not any(tmp_path.iterdir()), "parsing must not create the storage root"


def test_storage_expands_home_and_explicit_mlflow_uri_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = spec(study={"name": "t", "storage": "~/r", "mlflow_uri": "http://127.0.0.1:5000"})
    assert s.study.storage == str(tmp_path.resolve() / "r")
    assert s.tracking_uri == "http://127.0.0.1:5000"


def test_full_spec_builds_every_slice():
    s = spec(
        study={"name": "full.v1-a_b", "seeds": [3, 1], "description": "d"},
        workload={"type": "tiny_lm", "width": 32, "heads": 4, "layers": 1, "context": 16},
        optimizers=[
            {
                "name": "adamw",
                "label": "aw",
                "params": {
                    "lr": {"loguniform": [1e-4, 1e-2]},
                    "weight_decay": {"choice": [0.0, 0.1]},
                    "amsgrad": True,
                    "beta2": {"uniform": [0.9, 0.999]},
                },
            },
            {"name": "momentum", "params": {"lr": {"grid": [0.03, 0.1]}, "momentum": 0.9}},
        ],
        scale={
            "workers": 2,
            "cpus_per_worker": 0.5,
            "zero_stage": 3,
            "precision": "bf16",
            "micro_batch_size": 4,
            "grad_accum": 2,
            "launcher": "worker_group",
            "torch_threads": 2,
        },
        training={
            "steps": 40,
            "eval_every": 10,
            "grad_clip": 1,
            "log_every": 2,
            "schedule": {"type": "linear", "warmup_steps": 40, "min_ratio": 1},
        },
        search={
            "samples": 3,
            "seed": 7,
            "asha": {"grace_period": 4, "reduction_factor": 3},
            "max_concurrent_trials": 2,
        },
        measure={"every": 5, "probe_s": "1", "norms": False},
    )
    assert s.study.seeds == (3, 1) and s.study.name == "full.v1-a_b"
    assert s.workload.params == TinyLMConfig(layers=1, heads=4, width=32, context=16)
    assert [o.label for o in s.optimizers] == ["aw", "momentum"]
    assert s.optimizers[0].space["lr"] == Domain("loguniform", (1e-4, 1e-2))
    assert s.optimizers[1].space["lr"] == Domain("grid", (0.03, 0.1))
    assert s.scale.resolved_launcher == "worker_group" and s.scale.precision == "bf16"
    assert s.training.grad_clip == 1.0 and isinstance(s.training.grad_clip, float)
    assert s.training.schedule.min_ratio == 1.0 and s.search.asha.grace_period == 4
    assert (s.measure.every, s.measure.probe_s, s.measure.norms) == (5, "1", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.scale.workers = 3  # type: ignore[misc]


def test_mlp_hidden_list_becomes_tuple_and_null_slices_are_defaults():
    s = spec(workload={"type": "mlp_classify", "hidden": [16, 8]}, scale=None, training=None, search=None)
    assert s.workload.params == MLPClassifyConfig(hidden=(16, 8))
    assert s.scale == ScaleConfig() and s.training == TrainingConfig()


def test_eval_every_defaults_to_min_50_steps():
    assert spec(training={"steps": 10}).training.eval_every == 10
    assert spec(training={"steps": 120}).training.eval_every == 50
    assert spec(training={"steps": 10, "eval_every": None}).training.eval_every == 10


def test_asha_grace_period_counts_the_final_partial_evaluation():
    # steps 10, eval_every 3: evaluations after steps 3, 6, 9 and the last step 10 -> 4
    assert spec(training={"steps": 10, "eval_every": 3}, search={"asha": {"grace_period": 4}}).search.asha
    rejects("search.asha.grace_period", training={"steps": 10, "eval_every": 3}, search={"asha": {"grace_period": 5}})


def test_scalar_coercions():
    s = spec(study={"name": 2024}, measure={"probe_s": 1}, training={"grad_clip": 2})
    assert s.study.name == "2024" and s.measure.probe_s == "1" and s.training.grad_clip == 2.0


@pytest.mark.parametrize("probe_s", ["1", "uniform", "exponential"])
def test_probe_s_choices_are_accepted(probe_s):
    """docs/METRICS.md's three probe points (§Notation): s = 1, s ~ U[0, 1], s ~ Exp(1)."""
    assert spec(measure={"every": 1, "probe_s": probe_s}).measure.probe_s == probe_s
    # a label may be numeric in YAML; it becomes the string folder name
    assert spec(optimizers=[{"name": "sgd", "label": 7}]).optimizers[0].label == "7"


def test_boundaries_are_accepted():
    s = spec(
        scale={
            "workers": 4096,
            "micro_batch_size": 1 << 20,
            "grad_accum": 4096,
            "zero_stage": 3,
            "cpus_per_worker": 256,
            "torch_threads": 256,
        },
        training={"steps": 5, "eval_every": 5, "log_every": 5, "schedule": {"warmup_steps": 5}},
        study={"name": "x" * 128},
        search={"samples": 100_000},
    )
    assert s.scale.workers == 4096 and s.training.schedule.warmup_steps == 5
    assert spec(study={"name": "t", "seeds": [0, 2**31 - 1]}).study.seeds == (0, 2**31 - 1)
    assert spec(scale={"gpus_per_worker": 1, "precision": "fp16", "launcher": "in_process"}).scale.precision == "fp16"


def test_accelerator_separates_reserving_from_computing():
    """ScaleConfig is the one place that decides Ray resources, torch backend and DS accelerator:
    accelerator: cpu keeps the GPU reservation (a simulated cluster's logical GPUs) but trains
    on CPU over gloo; auto is the old coupling."""
    got = {
        acc: (s.ray_resources_per_worker, s.dist_backend, s.device)
        for acc, s in (
            (acc, spec(scale={"gpus_per_worker": g, "accelerator": acc, "cpus_per_worker": 0.5}).scale)
            for acc, g in (("auto", 0), ("cpu", 1), ("cuda", 1))
        )
    }
    assert got == {
        "auto": ({"CPU": 0.5}, "gloo", "cpu"),
        "cpu": ({"CPU": 0.5, "GPU": 1}, "gloo", "cpu"),
        "cuda": ({"CPU": 0.5, "GPU": 1}, "nccl", "cuda"),
    }
    auto_gpu = spec(scale={"gpus_per_worker": 1}).scale
    assert (auto_gpu.ray_resources_per_worker, auto_gpu.dist_backend) == ({"CPU": 1.0, "GPU": 1}, "nccl")


# ------------------------------------------------------------------------- every rule, by field
RULES = [
    # study
    ("study.name", {"study": {"name": "a/b"}}),
    ("study.name", {"study": {"name": "a..b"}}),
    ("study.name", {"study": {"name": ".a"}}),
    ("study.name", {"study": {"name": "x" * 129}}),
    ("study.name", {"study": {"name": ""}}),
    ("study.name", {"study": {"name": None}}),
    ("study.name", {"study": {}}),
    ("study.seeds", {"study": {"name": "t", "seeds": []}}),
    ("study.seeds", {"study": {"name": "t", "seeds": [1, 1]}}),
    ("study.seeds", {"study": {"name": "t", "seeds": [2**31]}}),
    ("study.seeds", {"study": {"name": "t", "seeds": [-1]}}),
    ("study.seeds[1]", {"study": {"name": "t", "seeds": [0, 0.5]}}),
    ("study.storage", {"study": {"name": "t", "storage": ""}}),
    ("study.storage", {"study": {"name": "t", "storage": "a\0b"}}),
    ("study.mlflow_uri", {"study": {"name": "t", "mlflow_uri": ["x"]}}),
    ("study.description", {"study": {"name": "t", "description": {"a": 1}}}),
    ("study.owner", {"study": {"name": "t", "owner": "me"}}),
    ("study", {"study": ["t"]}),
    # workload
    ("workload", {"workload": "quadratic"}),
    ("workload.type", {"workload": {}}),
    ("workload.type", {"workload": {"type": "resnet"}}),
    ("workload.type", {"workload": {"type": None}}),
    ("workload.width", {"workload": {"type": "tiny_lm", "width": 0}}),
    ("workload.width", {"workload": {"type": "tiny_lm", "width": 2**63}}),
    ("workload.heads", {"workload": {"type": "tiny_lm", "width": 10, "heads": 4}}),
    ("workload.dropout", {"workload": {"type": "tiny_lm", "dropout": 1.0}}),
    ("workload.dim", {"workload": {"type": "quadratic", "dim": -3}}),
    ("workload.lambda_max", {"workload": {"type": "quadratic", "lambda_min": 2, "lambda_max": 1}}),
    ("workload.dataset", {"workload": {"type": "mlp_classify", "dataset": "mnist"}}),
    ("workload.hidden[0]", {"workload": {"type": "mlp_classify", "hidden": ["wide"]}}),
    ("workload.layers", {"workload": {"type": "quadratic", "layers": 2}}),
    # scale
    ("scale", {"scale": 4}),
    ("scale.workers", {"scale": {"workers": 0}}),
    ("scale.workers", {"scale": {"workers": 4097}}),
    ("scale.workers", {"scale": {"workers": "2"}}),
    ("scale.gpus_per_worker", {"scale": {"gpus_per_worker": 8}}),
    ("scale.cpus_per_worker", {"scale": {"cpus_per_worker": -0.5}}),
    ("scale.cpus_per_worker", {"scale": {"cpus_per_worker": 257}}),
    ("scale.cpus_per_worker", {"scale": {"cpus_per_worker": float("nan")}}),
    ("scale.zero_stage", {"scale": {"zero_stage": -1}}),
    ("scale.precision", {"scale": {"precision": "FP32"}}),
    ("scale.precision", {"scale": {"precision": "fp16"}}),
    ("scale.precision", {"scale": {"gpus_per_worker": 1, "accelerator": "cpu", "precision": "fp16"}}),
    ("scale.accelerator", {"scale": {"accelerator": "gpu"}}),
    ("scale.accelerator", {"scale": {"accelerator": "cuda"}}),
    ("scale.micro_batch_size", {"scale": {"micro_batch_size": 0}}),
    ("scale.micro_batch_size", {"scale": {"micro_batch_size": (1 << 20) + 1}}),
    ("scale.micro_batch_size", {"scale": {"micro_batch_size": 10**30}}),
    ("scale.grad_accum", {"scale": {"grad_accum": 4097}}),
    ("scale.launcher", {"scale": {"launcher": "ssh"}}),
    ("scale.launcher", {"scale": {"launcher": "in_process", "workers": 2}}),
    ("scale.torch_threads", {"scale": {"torch_threads": 257}}),
    ("scale.nodes", {"scale": {"nodes": 2}}),
    # training
    ("training.steps", {"training": {"steps": 0}}),
    ("training.steps", {"training": {"steps": 10**9 + 1}}),
    ("training.steps", {"training": {"steps": 1.5}}),
    ("training.eval_every", {"training": {"steps": 10, "eval_every": 11}}),
    ("training.eval_every", {"training": {"eval_every": 0}}),
    ("training.grad_clip", {"training": {"grad_clip": 0}}),
    ("training.grad_clip", {"training": {"grad_clip": float("inf")}}),
    ("training.log_every", {"training": {"log_every": 0}}),
    ("training.log_every", {"training": {"steps": 10, "log_every": 11}}),
    ("training.schedule", {"training": {"schedule": "cosine"}}),
    ("training.schedule.type", {"training": {"schedule": {"type": "exp"}}}),
    ("training.schedule.warmup_steps", {"training": {"schedule": {"warmup_steps": -1}}}),
    ("training.schedule.warmup_steps", {"training": {"steps": 10, "schedule": {"warmup_steps": 11}}}),
    ("training.schedule.min_ratio", {"training": {"schedule": {"min_ratio": -0.1}}}),
    ("training.schedule.min_ratio", {"training": {"schedule": {"min_ratio": 1.1}}}),
    ("training.epochs", {"training": {"epochs": 1}}),
    # search
    ("search.samples", {"search": {"samples": 0}}),
    ("search.samples", {"search": {"samples": 100_001}}),
    ("search.seed", {"search": {"seed": "x"}}),
    ("search.max_concurrent_trials", {"search": {"max_concurrent_trials": 0}}),
    ("search.asha", {"search": {"asha": [1]}}),
    ("search.asha.metric", {"search": {"asha": {"metric": "acc"}}}),
    ("search.asha.grace_period", {"search": {"asha": {"grace_period": 0}}}),
    ("search.asha.grace_period", {"search": {"asha": {"grace_period": 3}}}),  # 100 / 50 = 2 evals
    ("search.asha.reduction_factor", {"search": {"asha": {"reduction_factor": 1}}}),
    ("search.asha.mode", {"search": {"asha": {"mode": "max"}}}),
    ("search.samples", {"optimizers": [{"name": "sgd"}, {"name": "adam"}], "search": {"samples": 50_001}}),
    ("search.samples", {"study": {"name": "t", "seeds": [0, 1]}, "search": {"samples": 50_001}}),
    # measure
    ("measure.every", {"measure": {"every": -5}}),
    ("measure.probe_s", {"measure": {"probe_s": "2"}}),
    ("measure.probe_s", {"measure": {"probe_s": "Uniform"}}),  # exact names only
    ("measure.norms", {"measure": {"norms": 1}}),
    ("measure.fp32_grads", {"measure": {"fp32_grads": 1}}),  # 1 == True in Python: refused all the same
    ("measure.fp32_grads", {"measure": {"fp32_grads": "on"}}),
    ("measure.fp32_grads", {"measure": {"fp32_grads": None}}),
    ("measure.hessian", {"measure": {"hessian": True}}),
    # measure.curvature_batch: "step" or {size: N, seed: S}, N divisible by workers x grad_accum
    ("measure.curvature_batch", {"measure": {"curvature_every": 2, "curvature_batch": "fixed"}}),
    ("measure.curvature_batch", {"measure": {"curvature_every": 2, "curvature_batch": 64}}),
    ("measure.curvature_batch", {"measure": {"curvature_batch": {"size": 8}}}),  # curvature off
    ("measure.curvature_batch.size", {"measure": {"curvature_every": 2, "curvature_batch": {"seed": 1}}}),
    ("measure.curvature_batch.size", {"measure": {"curvature_every": 2, "curvature_batch": {"size": 0}}}),
    ("measure.curvature_batch.size", {"measure": {"curvature_every": 2, "curvature_batch": {"size": "8"}}}),
    ("measure.curvature_batch.seed", {"measure": {"curvature_every": 2, "curvature_batch": {"size": 8, "seed": -1}}}),
    ("measure.curvature_batch.rows", {"measure": {"curvature_every": 2, "curvature_batch": {"size": 8, "rows": 1}}}),
    (
        "measure.curvature_batch.size",
        {"scale": {"workers": 2, "grad_accum": 2}, "measure": {"curvature_every": 2, "curvature_batch": {"size": 6}}},
    ),
    # optimizers
    ("optimizers", {"optimizers": []}),
    ("optimizers", {"optimizers": {"name": "sgd"}}),
    ("optimizers[0]", {"optimizers": ["sgd"]}),
    ("optimizers[0].name", {"optimizers": [{"name": "adamax"}]}),
    ("optimizers[0].name", {"optimizers": [{"params": {}}]}),
    ("optimizers[0].space", {"optimizers": [{"name": "sgd", "space": {}}]}),
    ("optimizers[0].params", {"optimizers": [{"name": "sgd", "params": [1]}]}),
    ("optimizers[1].params.lr2", {"optimizers": [{"name": "sgd"}, {"name": "adam", "params": {"lr2": 1}}]}),
    ("optimizers[0].params.momentum", {"optimizers": [{"name": "sgd", "params": {"momentum": 0.9}}]}),
    ("optimizers[0].params.betas", {"optimizers": [{"name": "adam", "params": {"betas": 0.9}}]}),
    ("optimizers[0].params.lr", {"optimizers": [{"name": "sgd", "params": {"lr": float("nan")}}]}),
    ("optimizers[0].params.lr", {"optimizers": [{"name": "sgd", "params": {"lr": 10**400}}]}),
    ("optimizers[0].params.lr", {"optimizers": [{"name": "sgd", "params": {"lr": -1}}]}),
    ("optimizers[0].params.lr", {"optimizers": [{"name": "sgd", "params": {"lr": "1e-x"}}]}),
    ("optimizers[0].params.lr", {"optimizers": [{"name": "sgd", "params": {"lr": {"grid": [0.1, -0.1]}}}]}),
    ("optimizers[0].params.lr", {"optimizers": [{"name": "sgd", "params": {"lr": {"sobol": [0, 1]}}}]}),
    ("optimizers[0].params.lr.loguniform", {"optimizers": [{"name": "sgd", "params": {"lr": {"loguniform": [0, 1]}}}]}),
    ("optimizers[0].params.lr.uniform", {"optimizers": [{"name": "sgd", "params": {"lr": {"uniform": [1, 1]}}}]}),
    ("optimizers[0].params.lr.choice", {"optimizers": [{"name": "sgd", "params": {"lr": {"choice": []}}}]}),
    ("optimizers[0].params.eps", {"optimizers": [{"name": "adam", "params": {"eps": -1e-8}}]}),
    ("optimizers[0].params.beta1", {"optimizers": [{"name": "adam", "params": {"beta1": {"choice": [0.9, 1.0]}}}]}),
    (
        "optimizers[0].params.weight_decay",
        {"optimizers": [{"name": "adamw", "params": {"weight_decay": {"uniform": [-1, 1]}}}]},
    ),
    ("optimizers[0].params.centered", {"optimizers": [{"name": "rmsprop", "params": {"centered": "yes"}}]}),
    ("optimizers[0].label", {"optimizers": [{"name": "sgd", "label": "a b"}]}),
    ("optimizers[0].label", {"optimizers": [{"name": "sgd", "label": ".."}]}),
    ("optimizers[0].label", {"optimizers": [{"name": "sgd", "label": ["x"]}]}),
    ("optimizers[2].label", {"optimizers": [{"name": "sgd"}, {"name": "adam"}, {"name": "sgd"}]}),
    ("optimizers[1].label", {"optimizers": [{"name": "sgd", "label": "x"}, {"name": "adam", "label": "x"}]}),
    (
        "optimizers[0].params",
        {
            "optimizers": [
                {
                    "name": "adam",
                    "params": {
                        k: {"grid": [round(lo + i * d, 6) for i in range(20)]}
                        for k, lo, d in (
                            ("lr", 1e-3, 1e-3),
                            ("beta1", 0.5, 0.01),
                            ("beta2", 0.9, 0.001),
                            ("weight_decay", 0.0, 0.001),
                        )
                    },
                }
            ]
        },
    ),
    # whole document
    (
        "",
        {
            "workload": {
                "type": "quadratic",
                "dim": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            }
        },
    ),  # noqa: E501 - the nesting is the point
    ("trainer", {"trainer": {}}),
]


@pytest.mark.parametrize("field,patch", RULES, ids=[f"{i:03d}-{f or '<top>'}" for i, (f, _) in enumerate(RULES)])
def test_rule_names_its_field(field, patch):
    err = rejects(field, **patch)  # rejects() asserts the field, the file and the message prefix
    assert err.message and "\n" not in str(err)  # one line that says what is allowed


def test_missing_required_slices_and_non_mapping_documents():
    for required in ("study", "workload", "optimizers"):
        data = {k: v for k, v in GOOD.items() if k != required}
        with pytest.raises(ConfigError, match=f"mem.yaml: {required}: is required"):
            parse_study(data, "mem.yaml")
    for doc in (None, [], [GOOD], "study", 3):
        with pytest.raises(ConfigError) as ei:
            parse_study(doc, "mem.yaml")
        assert ei.value.field == "" and str(ei.value).startswith("mem.yaml: <top>: ")


def test_messages_say_what_is_allowed():
    allowed = "allowed: measure, optimizers, scale, search, study, training, workload"
    assert allowed in rejects("trainer", trainer=1).message
    assert "mlp_classify, quadratic, resnet_cifar, tiny_lm" in rejects("workload.type", workload={"type": "x"}).message
    assert "adadelta, adagrad, adam, adamw" in rejects("optimizers[0].name", optimizers=[{"name": "x"}]).message
    msg = rejects("optimizers[0].params.momentm", optimizers=[{"name": "momentum", "params": {"momentm": 1}}]).message
    assert "allowed: dampening, lr, momentum, weight_decay" in msg
    assert (
        "Invalid learning rate"
        in rejects("optimizers[0].params.lr", optimizers=[{"name": "sgd", "params": {"lr": -1}}]).message
    )
    assert rejects("scale.zero_stage", scale={"zero_stage": 4}).message == "must be one of 0, 1, 2, 3"


def test_every_domain_value_is_checked_not_only_the_first():
    bad_second = [{"name": "adamw", "params": {"weight_decay": {"choice": [0.1, "heavy"]}}}]
    assert "heavy" in rejects("optimizers[0].params.weight_decay", optimizers=bad_second).message
    # the upper end of a uniform domain is checked too (beta2 = 1 is refused by torch)
    rejects("optimizers[0].params.beta2", optimizers=[{"name": "adam", "params": {"beta2": {"uniform": [0.9, 1.0]}}}])


def test_dataclasses_raise_field_error_on_the_bare_field():
    for make, field in (
        (lambda: ScaleConfig(workers=0), "workers"),
        (lambda: StudyConfig(name="a/b"), "name"),
        (lambda: TrainingConfig(steps=10, eval_every=20), "eval_every"),
        (
            lambda: TrainingConfig(steps=4, schedule=dataclasses.replace(TrainingConfig().schedule, warmup_steps=5)),
            "schedule.warmup_steps",
        ),
    ):
        with pytest.raises(FieldError) as ei:
            make()
        assert ei.value.field == field and str(ei.value).startswith(f"{field}: ")


# ------------------------------------------------------------------------- files: shipped and hostile
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_dir = (yaml.safe_load(path.read_text())["workload"]).get("data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        # the paper configs name data on a cluster's shared disk: refused where it is absent
        with pytest.raises(ConfigError) as ei:
            runnable(load_study(path))
        assert ei.value.field == "workload.data_dir" and data_dir in ei.value.message
        return
    s = load_study(path)
    runnable(s)
    assert s.source == str(path) and s.storage_root.is_absolute() and s.optimizers
    assert not any(tmp_path.iterdir()), "loading must not write anything"


def test_shipped_configs_exist_and_quickstart_is_the_readme_study():
    assert ROOT / "configs" / "quickstart.yaml" in SHIPPED
    s = load_study(ROOT / "configs" / "quickstart.yaml")
    assert [o.label for o in s.optimizers] == ["adamw", "momentum", "radam"]
    assert (s.scale.workers, s.scale.zero_stage, s.training.steps, s.measure.every) == (2, 2, 60, 5)


def test_corpus_is_large_and_well_formed():
    assert len(CORPUS) >= 180
    fields = {expected_field(p) for p in CORPUS}
    assert "" in fields and "scale.zero_stage" in fields and "optimizers[1].params.lr.loguniform" in fields
    # issue 12's classes: URIs, storage roots, trial ids, params, library errors, workload data
    assert {"study.mlflow_uri", "study.storage", "optimizers[0].label", "optimizers[0].params"} <= fields
    assert {"workload.data_dir", "workload.lambda_max", "optimizers[0].params.update_period"} <= fields


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_file_fails_naming_its_field(path):
    with pytest.raises(ConfigError) as ei:
        runnable(load_study(path))
    e = ei.value
    assert (e.field, e.file) == (expected_field(path), str(path)), str(e)
    assert "\n" not in str(e) and len(str(e)) < 1000


def test_generated_bad_files_fail_as_whole_file_problems(tmp_path):
    files = generated_bad_files(tmp_path)
    assert files["huge"].stat().st_size > MAX_CONFIG_BYTES
    messages = {}
    for kind, path in files.items():
        with pytest.raises(ConfigError) as ei:
            load_study(path)
        assert (ei.value.field, ei.value.file) == ("", str(path))
        messages[kind] = ei.value.message
    assert "empty" in messages["empty"] and "UTF-8" in messages["binary"]
    assert "bytes" in messages["huge"] and "cannot read" in messages["missing"]


def test_an_endless_file_is_read_only_up_to_the_cap():
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero on this system")
    with pytest.raises(ConfigError) as ei:
        load_study("/dev/zero")  # read_bytes() would never return
    assert ei.value.field == "" and "not a regular file" in ei.value.message


# ------------------------------------------------------------------------- YAML dialect details
def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    s = load_study(
        write(
            tmp_path,
            "study: {name: t}\nworkload: {type: quadratic}\noptimizers:\n"
            "  - name: adam\n    params: {lr: {loguniform: [1e-4, 3E-2]}, eps: 1e-8}\n",
        )
    )
    assert s.optimizers[0].space["lr"].values == (1e-4, 3e-2)
    assert s.optimizers[0].space["eps"] == Domain("fixed", (1e-8,))


def test_merge_keys_work_and_duplicates_are_refused(tmp_path):
    text = (
        "study: {name: t}\nworkload: {type: quadratic}\n"
        "optimizers:\n  - &o {name: sgd, params: {lr: 0.1}}\n  - {<<: *o, label: other}\n"
    )
    s = load_study(write(tmp_path, text))
    assert [o.label for o in s.optimizers] == ["sgd", "other"]
    with pytest.raises(ConfigError) as ei:
        load_study(
            write(tmp_path, "study: {name: t, name: u}\nworkload: {type: quadratic}\noptimizers: [{name: sgd}]\n")
        )
    assert ei.value.field == "study.name" and "line 1" in ei.value.message


def test_hostile_tag_does_not_execute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, "study: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_study(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.yaml"]


def test_curvature_batch_values(tmp_path, capsys):
    """measure.curvature_batch: "step" (the default) means the step's batch (None); a mapping is
    a fixed batch whose seed defaults to 0 and whose label goes into the curvature_batch column;
    a bad value is refused by `validate` with exit code 2, naming the file and the field."""
    assert spec().measure.curvature_batch is None
    assert spec(measure={"curvature_every": 3, "curvature_batch": "step"}).measure.curvature_batch is None
    fixed = spec(measure={"curvature_every": 3, "curvature_batch": {"size": 12}}).measure.curvature_batch
    assert (fixed.size, fixed.seed, fixed.label) == (12, 0, "fixed:size=12,seed=0")
    m = spec(measure={"curvature_every": 3, "curvature_batch": {"size": 12, "seed": 5}}).measure
    assert dataclasses.replace(m).curvature_batch == m.curvature_batch  # re-validation keeps it
    from opt_study.cli.main import main

    f = tmp_path / "bad.yaml"
    f.write_text(
        "study: {name: t}\nworkload: {type: quadratic}\noptimizers: [{name: sgd}]\n"
        "measure: {curvature_every: 2, curvature_batch: {size: -3}}\n"
    )
    assert main(["validate", str(f)]) == 2
    assert f"{f}: measure.curvature_batch.size: must be an integer" in capsys.readouterr().err
