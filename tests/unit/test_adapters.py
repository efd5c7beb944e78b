"""The adapter workloads: `dataset` (a user's Dataset + model by import path), `hf_causal_lm`
(transformers, the `hf` extra) and `torchvision` (the `vision` extra). Each builds from a study
spec, keeps the data contract (a batch is a pure function of seed, step and index; a fixed
evaluation slice) and trains a few steps through the real trial loop (DeepSpeed, one process).
A test of an adapter whose extra is not installed is skipped, saying which extra."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from opt_study.config import ConfigError, FieldError
from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial.loop import run_trial
from opt_study.workloads import make_workload
from opt_study.workloads.dataset_adapter import DatasetConfig
from opt_study.workloads.params import as_kwargs, frozen_kwargs

ROOT = Path(__file__).resolve().parents[2]
HAS_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason='needs the hf extra: pip install -e ".[hf]"')


def _torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA torchvision over the CPU torch fails to import
        return False
    return True


needs_vision = pytest.mark.skipif(
    not _torchvision_loads(), reason='needs the vision extra (a torchvision build matching torch): ".[vision]"'
)

DIGITS = {"type": "dataset", "dataset": "user_code:make_digits", "model": "user_code:make_mlp", "eval_size": 64}
TINY_GPT2 = {
    "type": "hf_causal_lm",
    "model_type": "gpt2",
    "config": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 256},
    "context": 16,
    "eval_windows": 8,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def train_a_few_steps(spec_factory, workload: dict, name: str, stage: int = 0, steps: int = 6):
    """Rows of a real trial (DeepSpeed, one rank) measured every 2 steps; eval at the end."""
    spec = spec_factory(
        study={"name": name},
        workload=workload,
        scale={"workers": 1, "zero_stage": stage, "micro_batch_size": 8, "grad_accum": 2},
        training={"steps": steps, "eval_every": steps},
        optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
        measure={"every": 2},
    )
    final = run_trial(spec, TrialPlan("t", "adamw", "adamw", {"lr": 0.01}, seed=1, index=0), report=lambda m: None)
    assert final["status"] == "completed" and final["step"] == steps
    return spec, read_steps(spec.study_dir).to_pylist()


def check_contract(w, mbs: int = 4) -> None:
    """A batch is a pure function of (seed, step, index): reading others in between or drawing
    from the global RNG changes nothing, and reading leaves the global RNG where it was; the
    evaluation batches are the same on every call."""
    first = w.train_batch(5, 1, mbs)
    w.train_batch(0, 0, mbs)
    torch.rand(3)
    rng = torch.get_rng_state()
    again = w.train_batch(5, 1, mbs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert same(first, again)
    assert not same(first, w.train_batch(5, 2, mbs)) and not same(first, w.train_batch(6, 1, mbs))
    assert all(same(a, b) for a, b in zip(w.eval_batches(mbs, 0, 2), w.eval_batches(mbs, 0, 2)))


# ------------------------------------------------------------------------------------- dataset
def test_kwargs_are_frozen_sorted_and_checked():
    pairs = frozen_kwargs({"b": [1, 2], "a": 0.5}, "model_args")
    assert pairs == (("a", 0.5), ("b", (1, 2))) and hash(pairs)
    assert as_kwargs(pairs) == {"a": 0.5, "b": [1, 2]}
    with pytest.raises(FieldError, match="b: must be a number") as e:
        frozen_kwargs({"b": {"nested": 1}}, "model_args")
    assert e.value.field == "model_args"
    with pytest.raises(FieldError, match="identifiers"):
        frozen_kwargs({"not a name": 1}, "x")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dataset": "user_code.make_digits", "model": "user_code:make_mlp"}, "dataset"),
        ({"dataset": "user_code:make_digits", "model": "make_mlp"}, "model"),
        ({"dataset": "a:b", "model": "a:b", "eval_dataset": "x y:z"}, "eval_dataset"),
        ({"dataset": "a:b", "model": "a:b", "loss": "hinge"}, "loss"),
        ({"dataset": "a:b", "model": "a:b", "eval_size": 0}, "eval_size"),
    ],
)
def test_dataset_config_refuses(kwargs, field):
    with pytest.raises(FieldError) as e:
        DatasetConfig(**kwargs)
    assert e.value.field == field


def test_dataset_config_imports_nothing_and_validate_names_the_field(spec_factory):
    # a module that does not exist is fine at validate time: it is imported when the trial runs
    spec = spec_factory(workload={"type": "dataset", "dataset": "no_such_mod:f", "model": "no_such_mod:g"})
    assert spec.workload.params.dataset == "no_such_mod:f"
    with pytest.raises(ConfigError) as e:
        spec_factory(workload={"type": "dataset", "dataset": "user_code:make_digits"})
    assert e.value.field == "workload.model"
    with pytest.raises(ConfigError) as e:
        spec_factory(workload={**DIGITS, "model_args": {"hidden": {"x": 1}}})
    assert e.value.field == "workload.model_args"
    with pytest.raises(ConfigError, match="supports fp32"):
        spec_factory(workload=DIGITS, scale={"zero_stage": 2, "precision": "bf16"})
    with pytest.raises(FieldError, match="cannot import module 'no_such_mod'") as e2:
        make_workload("dataset", spec.workload.params, 0)
    assert e2.value.field == "dataset"
    with pytest.raises(FieldError, match="map-style") as e2:
        make_workload("dataset", DatasetConfig(dataset="user_code:make_iterable", model="user_code:make_mlp"), 0)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_dataset_batches_are_pure_and_the_eval_slice_is_held_out(noise):
    cfg = DatasetConfig(**{k: v for k, v in DIGITS.items() if k != "type"}, dataset_args={"noise": noise})
    w = make_workload("dataset", cfg, 3)
    check_contract(w)
    x, y = w.train_batch(0, 0, 8)
    assert x.shape == (8, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert w.units_per_batch((x, y)) == 8
    # the last 64 of the 1,797 items are the evaluation slice, never sampled for training
    assert w.n_train == 1797 - 64 and list(w.eval_items) == list(range(1733, 1797))
    if noise == 0.0:  # every training item drawn is one of the first 1,733
        drawn = torch.cat([w.train_batch(s, 0, 64)[0] for s in range(4)])
        idx = torch.cdist(drawn, w.train.x, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        assert torch.equal(w.train.x[idx], drawn) and int(idx.max()) < 1733 and len(set(idx.tolist())) > 200
    ev = w.eval_batches(16, 0, 1)
    assert len(ev) == 4 and torch.equal(torch.cat([b[1] for b in ev]), w.train.y[1733:1797])
    if noise == 0.0:
        assert torch.equal(ev[0][0], w.train.x[1733:1749])
    # two ranks split the slice: rank r gets batches r, r + 2, ... of it
    assert torch.equal(w.eval_batches(16, 1, 2)[0][1], w.train.y[1749:1765])
    # the model: the user's factory, initialised from the seed alone
    m1, m2 = w.build_model(), make_workload("dataset", cfg, 3).build_model()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(next(m1.parameters()), next(make_workload("dataset", cfg, 4).build_model().parameters()))


def test_dataset_adapter_trains_through_the_trial_loop(spec_factory):
    spec, rows = train_a_few_steps(spec_factory, {**DIGITS, "model_args": {"hidden": 16}}, "ds")
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[-1]["loss"] < rows[0]["loss"] and 1.5 < rows[0]["loss"] < 3.0  # ln 10 = 2.30 at init
    assert [r["measured"] for r in rows] == [False, True, False, True, False, True]  # steps 1, 3, 5
    assert rows[-1]["eval_loss"] < rows[0]["loss"]


# ---------------------------------------------------------------------------------- hf_causal_lm
@needs_hf
def test_hf_config_is_checked_against_transformers(spec_factory):
    from opt_study.workloads.hf_causal_lm import HFCausalLMConfig

    cfg = HFCausalLMConfig(model_type="llama", config={"num_hidden_layers": 1, "hidden_size": 32})
    assert cfg.config == (("hidden_size", 32), ("num_hidden_layers", 1))
    for kwargs, field, msg in (
        ({"model_type": "nope"}, "model_type", "not a transformers model type"),
        ({"model_type": "vit"}, "model_type", "no causal-LM model"),
        ({"config": {"n_layers": 2}}, "config", "n_layers: not a field of transformers.GPT2Config"),
        ({"config": {"n_positions": 8}, "context": 16}, "context", "max_position_embeddings 8"),
        ({"attn_implementation": "flash"}, "attn_implementation", "sdpa"),
    ):
        with pytest.raises(FieldError, match=msg) as e:
            HFCausalLMConfig(**kwargs)
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        spec_factory(workload={**TINY_GPT2, "config": {"n_layer": 1, "n_embds": 32}})
    assert e.value.field == "workload.config" and "n_embds" in e.value.message


@needs_hf
def test_hf_batches_vocab_and_model(tmp_path):
    from opt_study.workloads.hf_causal_lm import HFCausalLMConfig
    from opt_study.workloads.prepare import local_documents, prepare_token_files

    cfg = HFCausalLMConfig(**{k: v for k, v in TINY_GPT2.items() if k != "type"})
    w = make_workload("hf_causal_lm", cfg, 0)
    check_contract(w)
    ids, labels = w.train_batch(0, 0, 4)
    assert ids.shape == (4, 16) and ids.dtype == torch.int64 and torch.equal(ids, labels)
    assert w.units_per_batch((ids, labels)) == 4 * 15
    assert len(w.data.val_windows) == 8 and int(w.data.val_windows.max()) < 256
    model = w.build_model()
    assert type(model).__name__ == "GPT2LMHeadModel"
    # random init from the seed alone; the loss near ln 256 = 5.55 at init
    again = make_workload("hf_causal_lm", cfg, 0).build_model()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    model.eval()
    with torch.no_grad():
        assert abs(float(w.loss(model, (ids, labels))) - 5.55) < 0.3
    # prepare.py's token files are read as well, and their vocabulary is checked against the model's
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    prepare_token_files(local_documents([corpus]), tmp_path / "tok", val_fraction=0.2)
    wt = make_workload("hf_causal_lm", HFCausalLMConfig(**{**cfg.__dict__, "data": str(tmp_path / "tok")}), 0)
    assert wt.data.vocab == 256 and wt.data.n_train == 1441 and len(wt.data.val_windows) == 8
    small = {**TINY_GPT2["config"], "vocab_size": 100}
    with pytest.raises(FieldError, match="vocabulary of 256") as e:
        make_workload("hf_causal_lm", HFCausalLMConfig(**{**cfg.__dict__, "config": small}), 0)
    assert e.value.field == "config"


@needs_hf
@pytest.mark.parametrize("model_type, config", [("gpt2", TINY_GPT2["config"])])
def test_hf_adapter_trains_through_the_trial_loop(spec_factory, model_type, config):
    spec, rows = train_a_few_steps(spec_factory, {**TINY_GPT2, "model_type": model_type, "config": config}, "hf")
    assert [r["step"] for r in rows] == list(range(6))
    assert abs(rows[0]["loss"] - 5.55) < 0.3 and rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert rows[-1]["eval_loss"] < rows[0]["loss"]


@needs_hf
def test_hf_llama_builds_and_trains(spec_factory):
    llama = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    llama |= {"num_key_value_heads": 1, "vocab_size": 256, "max_position_embeddings": 32}
    llama |= {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    _, rows = train_a_few_steps(spec_factory, {**TINY_GPT2, "model_type": "llama", "config": llama}, "llama", stage=2)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3


@needs_hf
def test_the_hf_example_study_validates():
    """examples/hf_causal_lm/study.yaml: 2 workers at ZeRO-2, measured every 5 steps (the example
    itself is run by hand: about 3.5 minutes on 2 loaded cores, README there)."""
    from opt_study.validate import load_study

    spec = load_study(ROOT / "examples" / "hf_causal_lm" / "study.yaml")
    assert spec.workload.type == "hf_causal_lm" and spec.workload.params.data == "builtin"
    assert (spec.scale.workers, spec.scale.zero_stage, spec.measure.every) == (2, 2, 5)
    w = make_workload("hf_causal_lm", spec.workload.params, 0)
    # GPT-2 of 2 blocks x width 64, head tied: wte 256·64 + wpe 64·64 + 2 x 49,984 + ln_f 128
    assert sum(p.numel() for p in w.build_model().parameters()) == 120_576


# ---------------------------------------------------------------------------------- torchvision
def test_synthetic_images_are_fixed_and_learnable():
    """The torchvision adapter's synthetic set (no torchvision needed for the data): item i is a
    pure function of i, its label i mod C, and the nearest class template classifies it."""
    from types import SimpleNamespace

    from opt_study.workloads.torchvision_models import SyntheticImages

    data = SyntheticImages(SimpleNamespace(image_size=8, num_classes=5, noise=1.0))
    x, y = data.items(torch.arange(100))
    x2, _ = data.items(torch.tensor([7, 3]))
    assert x.shape == (100, 3, 8, 8) and torch.equal(y, torch.arange(100) % 5)
    assert torch.equal(x2[0], x[7]) and torch.equal(x2[1], x[3])
    templates, _ = SyntheticImages(SimpleNamespace(image_size=8, num_classes=5, noise=0.0)).items(torch.arange(5))
    nearest = torch.cdist(x.flatten(1), templates.flatten(1)).argmin(1)
    assert torch.equal(nearest, y)  # at noise 1 over 192 pixels the classes are far apart
    assert 0.8 < float((x - templates[y]).std()) < 1.2


def test_torchvision_config_without_torchvision_says_how_to_install():
    if _torchvision_loads():
        pytest.skip("torchvision is installed here: the refusal is not reachable")
    from opt_study.workloads.torchvision_models import TorchvisionConfig

    with pytest.raises(FieldError, match="vision") as e:
        TorchvisionConfig()
    assert e.value.field == "arch"


@needs_vision
def test_torchvision_synthetic_data_and_training(spec_factory):
    from opt_study.workloads.torchvision_models import TorchvisionConfig

    with pytest.raises(FieldError) as e:
        TorchvisionConfig(arch="resnet19")
    assert e.value.field == "arch"
    cfg = TorchvisionConfig(arch="resnet18", num_classes=4, image_size=16, train_samples=64, eval_samples=16)
    w = make_workload("torchvision", cfg, 0)
    check_contract(w)
    x, y = w.train_batch(0, 0, 8)
    assert x.shape == (8, 3, 16, 16) and torch.equal(y, w.train_batch(0, 0, 8)[1]) and int(y.max()) < 4
    ev = w.eval_batches(8, 0, 1)
    assert torch.equal(torch.cat([b[1] for b in ev]), torch.arange(64, 80) % 4)
    wl = {"type": "torchvision", "arch": "resnet18", "num_classes": 4, "image_size": 16, "train_samples": 64}
    _, rows = train_a_few_steps(spec_factory, {**wl, "eval_samples": 16}, "tv")
    assert rows[-1]["loss"] < rows[0]["loss"]
