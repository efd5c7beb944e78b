"""The paper-scale workloads (gpt2, resnet_cifar) on small files written in the real formats, the
token-file preparation, and the paper / Crowded-Valley study files (validate + dry run on CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from opt_study import optim
from opt_study.cli import main as cli
from opt_study.config import FieldError
from opt_study.validate import load_study
from opt_study.workloads import make_workload
from opt_study.workloads.base import STREAM_TRAIN, generator
from opt_study.workloads.gpt2 import GPT2, GPT2Config, flops_per_token, n_params
from opt_study.workloads.prepare import main as prepare_main
from opt_study.workloads.prepare import prepare_token_files
from opt_study.workloads.resnet_cifar import (
    PAD,
    RECORD_BYTES,
    TEST_FILE,
    TRAIN_FILES,
    ResNet,
    ResNetCifarConfig,
    augment,
    channel_stats,
    read_cifar_binary,
)

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "opt_study" / "workloads" / "data" / "corpus.txt"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, two threads made the small convolutions
    here 50x slower (spin-waiting threads), and these models gain nothing from a second one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_steps(w, model, opt, steps: int, mbs: int) -> None:
    model.train()
    for step in range(steps):
        opt.zero_grad()
        w.loss(model, w.train_batch(step, 0, mbs)).backward()
        opt.step()


def eval_loss(w, model, mbs: int) -> float:
    model.eval()
    with torch.no_grad():
        batches = w.eval_batches(mbs, 0, 1)
        return sum(w.loss(model, b).item() for b in batches) / len(batches)


# ----------------------------------------------------------------------------------- preparation
def test_prepare_byte_tokens_round_trip(tmp_path):
    docs = ["hello world\n", "zwei W\u00f6rter\0!", "third"]
    meta = prepare_token_files(docs, tmp_path, "bytes", val_fraction=0.2, sources=["mem"])
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    stream = b"".join(d.encode().replace(b"\0", b"") + b"\0" for d in docs)
    assert np.array_equal(np.concatenate([train, val]), np.frombuffer(stream, np.uint8))
    assert len(val) == int(len(stream) * 0.2) and len(train) == len(stream) - len(val)
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["documents"]) == ("bytes", 256, 0, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_cli_reads_directories_and_refuses_bad_input(tmp_path, capsys):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("bbbb")
    (src / "sub" / "a.txt").write_text("aa")
    (src / "skip.md").write_text("not a txt file")
    assert prepare_main(["--text", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]) == 0
    tokens = np.concatenate([np.fromfile(tmp_path / "out" / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    assert bytes(tokens.astype(np.uint8)) == b"bbbb\0aa\0"  # sorted paths: b.txt < sub/a.txt
    assert "type: gpt2" in capsys.readouterr().out
    (src / "bad.txt").write_bytes(b"\xff\xfe")
    assert prepare_main(["--text", str(src), "--out", str(tmp_path / "bad")]) == 2
    assert "bad.txt' is not UTF-8" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("*.bin*")), "a failed run leaves no token files"
    assert prepare_main(["--text", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file or directory" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="too few"):
        prepare_token_files(["a"], tmp_path / "tiny", "bytes", val_fraction=0.5)


@pytest.mark.skipif(importlib.util.find_spec("tiktoken") is not None, reason="tiktoken is installed")
def test_prepare_gpt2_tokenizer_needs_tiktoken(tmp_path):
    with pytest.raises(SystemExit, match="tiktoken"):
        prepare_token_files(["text"], tmp_path, "gpt2")


# ----------------------------------------------------------------------------------------- gpt2
@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("owt")
    prepare_token_files([CORPUS.read_text()], out, "bytes", val_fraction=0.05)
    return out


def tiny_gpt2(data_dir, **kw) -> GPT2Config:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, data_dir=str(data_dir), eval_windows=64)
    return GPT2Config(**{**base, **kw})


def test_gpt2_small_has_124m_parameters():
    cfg = GPT2Config()
    with torch.device("meta"):
        model = GPT2(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == n_params(cfg) == 124_439_808
    assert abs(count - 124e6) / 124e6 < 0.01
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, listed once
    assert (len(model.transformer.h), model.transformer.h[0].attn.n_head) == (12, 12)
    # 6N + 12 L d T (PaLM appendix B): 6 * 123,653,376 + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg) == 6 * 123_653_376 + 12 * 12 * 768 * 1024


def test_gpt2_batches_are_windows_of_the_token_file(byte_data):
    w = make_workload("gpt2", tiny_gpt2(byte_data), seed=3)
    x, y = w.train_batch(step=5, index=2, micro_batch_size=4)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = np.fromfile(byte_data / "train.bin", dtype=np.uint16)
    starts = torch.randint(0, len(train) - 33 + 1, (4,), generator=generator(STREAM_TRAIN, 3, 5, 2))
    for row, s in zip(x, starts.tolist()):
        assert np.array_equal(row.numpy(), train[s : s + 32])
    rng = torch.get_rng_state()
    again = w.train_batch(5, 2, 4)
    assert torch.equal(again[0], x) and torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(w.train_batch(5, 3, 4)[0], x)
    assert w.units_per_batch((x, y)) == 4 * 32


def test_gpt2_eval_set_is_fixed_and_split_evenly(byte_data):
    w = make_workload("gpt2", tiny_gpt2(byte_data, eval_windows=12), seed=0)
    val = np.fromfile(byte_data / "val.bin", dtype=np.uint16)
    stride = len(val) // 12
    assert stride >= 33 and w.val_windows.shape == (12, 33)
    assert np.array_equal(w.val_windows[7].numpy(), val[7 * stride : 7 * stride + 33])
    whole = w.eval_batches(2, 0, 1)
    by_rank = [w.eval_batches(2, r, 3) for r in range(3)]
    interleaved = [by_rank[j % 3][j // 3] for j in range(6)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(interleaved, whole))
    assert torch.equal(make_workload("gpt2", w.cfg, seed=9).val_windows, w.val_windows)


def test_gpt2_model_is_deterministic_causal_and_learns(byte_data):
    w = make_workload("gpt2", tiny_gpt2(byte_data), seed=1)
    rng = torch.get_rng_state()
    model = w.build_model()
    assert torch.equal(torch.get_rng_state(), rng), "init must not touch the global RNG"
    other = make_workload("gpt2", w.cfg, seed=1).build_model()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert sum(p.numel() for p in model.parameters()) == n_params(w.cfg)
    x = w.train_batch(0, 0, 2)[0]
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % 256
    model.eval()
    with torch.no_grad():  # changing future tokens leaves earlier logits unchanged
        assert torch.allclose(model(x)[:, :20], model(x2)[:, :20], atol=1e-6)
    before = eval_loss(w, model, 8)
    assert abs(before - math.log(256)) < 0.3  # N(0, 0.02) init predicts nearly uniformly
    torch.manual_seed(0)
    train_steps(w, model, torch.optim.AdamW(model.parameters(), lr=1e-2), steps=15, mbs=8)
    after = eval_loss(w, model, 8)
    assert after < before - 1.0, (before, after)


def test_gpt2_refuses_missing_or_mismatched_files(byte_data, tmp_path):
    with pytest.raises(FieldError) as e:
        make_workload("gpt2", tiny_gpt2(tmp_path / "nowhere"), 0)
    assert e.value.field == "data_dir" and "prepare" in e.value.message
    with pytest.raises(FieldError) as e:  # meta.json says 256 tokens
        make_workload("gpt2", tiny_gpt2(byte_data, vocab_size=200), 0)
    assert e.value.field == "vocab_size"
    for f in ("train.bin", "val.bin"):
        (tmp_path / f).write_bytes(bytes(range(200)) * 3)  # byte 255 pairs -> ids above 200
    with pytest.raises(FieldError) as e:  # no meta.json: caught on the tokens themselves
        make_workload("gpt2", tiny_gpt2(tmp_path, vocab_size=300), 0)
    assert e.value.field == "vocab_size" and "outside" in e.value.message
    (tmp_path / "train.bin").write_bytes(b"\0" * 65)
    with pytest.raises(FieldError, match="whole number"):
        make_workload("gpt2", tiny_gpt2(tmp_path, vocab_size=65536), 0)
    with pytest.raises(FieldError) as e:
        GPT2Config(n_embd=100, n_head=3)
    assert e.value.field == "n_head"
    assert Path(GPT2Config(data_dir="rel/dir").data_dir).is_absolute()


# ----------------------------------------------------------------------------------- resnet_cifar
def write_cifar(d: Path, per_file: int = 24, n_test: int = 30, seed: int = 0, learnable: bool = True) -> None:
    """Tiny CIFAR-10 binary files: class k images are noise around brightness 20 + 23 k (learnable)."""
    rs = np.random.RandomState(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in [(f, per_file) for f in TRAIN_FILES] + [(TEST_FILE, n_test)]:
        labels = rs.randint(0, 10, n).astype(np.uint8)
        base = (20 + 23 * labels.astype(np.int64))[:, None] if learnable else 128
        pixels = np.clip(base + rs.randint(-15, 16, (n, 3072)), 0, 255).astype(np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(d / name)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cifar")
    write_cifar(d)
    return d


def tiny_resnet(data_dir, **kw) -> ResNetCifarConfig:
    return ResNetCifarConfig(**{**dict(data_dir=str(data_dir), blocks=(1, 1), width=8), **kw})


def test_cifar_binary_layout(tmp_path):
    rec = np.zeros((2, RECORD_BYTES), np.uint8)
    rec[:, 0] = [7, 3]
    rec[1, 1 + 0 * 1024 + 1 * 32 + 2] = 11  # red, row 1, column 2
    rec[1, 1 + 2 * 1024 + 31 * 32 + 0] = 99  # blue, row 31, column 0
    rec.tofile(tmp_path / "b.bin")
    images, labels = read_cifar_binary(tmp_path / "b.bin")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [7, 3]
    assert images[1, 0, 1, 2] == 11 and images[1, 2, 31, 0] == 99 and images.sum() == 110
    (tmp_path / "short.bin").write_bytes(bytes(RECORD_BYTES + 5))
    with pytest.raises(FieldError, match="whole number"):
        read_cifar_binary(tmp_path / "short.bin")


def test_channel_stats_are_exact():
    imgs = np.random.RandomState(1).randint(0, 256, (17, 3, 32, 32)).astype(np.uint8)
    mean, std = channel_stats(imgs)
    x = imgs.astype(np.float64) / 255
    assert np.allclose(mean.flatten().numpy(), x.mean(axis=(0, 2, 3)), atol=1e-7)
    assert np.allclose(std.flatten().numpy(), x.std(axis=(0, 2, 3)), atol=1e-7)


def test_augment_is_a_crop_and_flip_drawn_from_the_generator():
    imgs = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = augment(imgs, generator(STREAM_TRAIN, 0, 1, 2))
    assert torch.equal(out, augment(imgs, generator(STREAM_TRAIN, 0, 1, 2)))
    g = generator(STREAM_TRAIN, 0, 1, 2)
    offsets = torch.randint(0, 2 * PAD + 1, (6, 2), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(imgs, (PAD,) * 4)
    for i in range(6):
        oy, ox = offsets[i].tolist()
        crop = padded[i, :, oy : oy + 32, ox : ox + 32]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)


def test_resnet_batches_are_pure_and_normalised(cifar):
    w = make_workload("resnet_cifar", tiny_resnet(cifar, augment=False), seed=4)
    x, y = w.train_batch(3, 1, 16)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    rng = torch.get_rng_state()
    assert torch.equal(w.train_batch(3, 1, 16)[0], x) and torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(w.train_batch(3, 2, 16)[0], x)
    idx = torch.randint(0, 5 * 24, (16,), generator=generator(STREAM_TRAIN, 4, 3, 1))
    raw = (x * w.std + w.mean) * 255  # undo the normalisation: the stored bytes come back
    assert torch.allclose(raw, w.train_x[idx].float(), atol=1e-3) and torch.equal(y, w.train_y[idx])
    full = w._normalise(w.train_x)
    assert torch.allclose(full.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(full.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    aug = make_workload("resnet_cifar", tiny_resnet(cifar), seed=4)
    assert not torch.equal(aug.train_batch(3, 1, 16)[0], x) and torch.equal(aug.train_batch(3, 1, 16)[1], y)
    assert w.units_per_batch((x, y)) == 16


def test_resnet_eval_set_split_evenly_across_ranks(cifar):
    w = make_workload("resnet_cifar", tiny_resnet(cifar, eval_samples=24), seed=0)
    whole = w.eval_batches(4, 0, 1)
    assert len(whole) == 6 and torch.equal(whole[0][1], w.test_y[:4])
    by_rank = [w.eval_batches(4, r, 2) for r in range(2)]
    assert all(torch.equal(by_rank[j % 2][j // 2][0], whole[j][0]) for j in range(6))


def test_resnet18_parameter_count_and_buffers():
    with torch.device("meta"):
        model = ResNet(ResNetCifarConfig())
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    bn = [n for n, _ in model.named_buffers() if n.endswith("running_mean")]
    assert len(bn) == 1 + 8 * 2 + 3  # stem + two per block + three projection shortcuts


def test_resnet_learns_and_accepts_half_precision_weights(cifar):
    w = make_workload("resnet_cifar", tiny_resnet(cifar), seed=0)
    model = w.build_model()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.parameters(), make_workload("resnet_cifar", w.cfg, 0).build_model().parameters())
    )
    # A few SGD steps on one batch (train mode: BatchNorm uses the batch's statistics) must fit it;
    # 40 steps on fresh batches also lower the eval loss, but too noisily for a 1 s test.
    batch = w.train_batch(0, 0, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = w.loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.4, losses
    half = w.build_model().to(torch.bfloat16)  # DeepSpeed bf16 casts the module, not the inputs
    assert torch.isfinite(w.loss(half, w.train_batch(0, 0, 4)))


def test_resnet_refuses_bad_data(tmp_path):
    with pytest.raises(FieldError) as e:
        make_workload("resnet_cifar", tiny_resnet(tmp_path), 0)
    assert e.value.field == "data_dir" and "data_batch_1.bin" in e.value.message
    write_cifar(tmp_path, per_file=2, n_test=2)
    with pytest.raises(FieldError) as e:
        make_workload("resnet_cifar", tiny_resnet(tmp_path, num_classes=3), 0)
    assert e.value.field == "num_classes"
    for bad, field in ((dict(blocks=()), "blocks"), (dict(width=0), "width"), (dict(augment="yes"), "augment")):
        with pytest.raises(FieldError) as e:
            ResNetCifarConfig(**bad)
        assert e.value.field == field


# ---------------------------------------------------------------------------------- study files
PAPER = {"paper_gpt2_124m.yaml": "gpt2", "paper_resnet18_cifar10.yaml": "resnet_cifar", "crowded_valley_gpu.yaml": None}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_study_files_validate_and_dry_run(name, capsys, tmp_path):
    shipped = ROOT / "configs" / name
    text = shipped.read_text()
    if not Path("/mnt/shared/data").is_dir():  # a machine without the cluster's data mount
        assert cli.main(["validate", str(shipped)]) == 2  # refused in one line, naming the field
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "workload.data_dir" in err and "not a directory" in err
        data = tmp_path / "data"
        data.mkdir()
        text = text.replace("/mnt/shared/data", str(data))
        (Path(yaml.safe_load(text)["workload"]["data_dir"])).mkdir(parents=True)
    path = tmp_path / name
    path.write_text(text)
    spec = load_study(path)
    assert (spec.scale.workers, spec.scale.gpus_per_worker, spec.scale.zero_stage) == (8, 1, 2)
    assert spec.measure.every == 10
    assert all(o.name in optim.OPTIMIZERS for o in spec.optimizers)
    if PAPER[name]:
        assert spec.workload.type == PAPER[name]
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr()  # the plan table on stdout (pipeable), the verdict on stderr
    assert out.err.startswith(f"{path}: OK") and out.out.startswith(f"study:               {spec.study.name}")
    assert cli.main(["run", str(path), "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    plan = doc["summary"]
    assert plan["trials"] == sum(plan["per_optimizer"].values()) > 0
    assert len(doc["trials"]) >= plan["trials"]  # crowded_valley: its later reruns as an upper bound
    assert plan["resources_per_trial"]["total_gpu"] == 8
    assert plan["study_dir"] == str(spec.study_dir)


def test_paper_gpt2_study_is_gpt2_small_in_bf16():
    spec = load_study(ROOT / "configs" / "paper_gpt2_124m.yaml")
    assert n_params(spec.workload.params) == 124_439_808
    assert spec.scale.precision == "bf16"
    assert {o.name for o in spec.optimizers} == {"adamw", "momentum"}


def test_paper_resnet_study_uses_sgd_and_adam():
    spec = load_study(ROOT / "configs" / "paper_resnet18_cifar10.yaml")
    assert spec.workload.params.blocks == (2, 2, 2, 2) and spec.workload.params.width == 64
    assert {o.name for o in spec.optimizers} == {"momentum", "adam"}


def test_crowded_valley_study_compares_many_optimizers_with_equal_budgets():
    from opt_study.study.run import describe

    spec = load_study(ROOT / "configs" / "crowded_valley_gpu.yaml")
    assert len({o.name for o in spec.optimizers}) >= 8
    budgets = set(describe(spec)["per_optimizer"].values())
    assert len(budgets) == 1 and budgets.pop() >= 10
