"""The two training loops the throughput benchmarks compare, run inside one torchrun job.

- `opt_study_trial`: the real `opt_study.trial.run_trial` (engine, measurer, Parquet rows); its
  per-step end times come back from the Parquet rows it wrote (`time_unix`, taken after each
  step's measurer has finished and before evaluation) and `step_time_s` (begin..end of the step).
- `plain_deepspeed`: `deepspeed.initialize` + forward/backward/step on the same model (same seed,
  same initialisation), the same torch optimizer and hyperparameters, the same micro-batches and
  the same DeepSpeed config; end times are taken the same way, after each `engine.step()`.

Both take the per-step end times, so steps/s over a window that skips the warm-up steps is
measured identically for both (`interleaved`, `common.window_rate`).
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time

import torch

from opt_study import distributed
from opt_study.measure.hook import StepMeasurer
from opt_study.plan import TrialPlan
from opt_study.trial.loop import run_trial
from opt_study.validate import parse_study


def init() -> None:
    """Join torchrun's gloo group and quiet DeepSpeed's per-engine banners."""
    distributed.init_process_group("gloo")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def shared_tempdir() -> tuple[tempfile.TemporaryDirectory | None, str]:
    """A storage root made on rank 0 and broadcast (every rank must name the same study dir)."""
    tmp = tempfile.TemporaryDirectory(prefix="optstudy-bench-") if distributed.rank() == 0 else None
    path = distributed.broadcast_object(tmp.name if tmp else None)
    return tmp, path


def opt_study_trial(doc: dict, trial_id: str, measurer_cls=StepMeasurer) -> dict | None:
    """Run one trial through run_trial; on rank 0 return its step rows as columns, else None."""
    spec = parse_study(doc)
    opt = doc["optimizers"][0]
    plan = TrialPlan(
        trial_id=trial_id, label=opt["name"], optimizer=opt["name"], hparams=dict(opt["params"]), seed=0, index=0
    )
    gc.collect()
    distributed.barrier()  # start together: a rank still tearing down would count as step time
    run_trial(spec, plan, report=lambda m: None, measurer_cls=measurer_cls)
    distributed.barrier()
    if distributed.rank() != 0:
        return None
    from opt_study.results.parquet import read_steps

    t = read_steps(spec.study_dir, trial_ids=[trial_id])
    cols = {k: t.column(k).to_pylist() for k in ("step", "time_unix", "step_time_s", "loss", "measured")}
    assert cols["step"] == list(range(spec.training.steps)), "a step row is missing"
    return cols


def plain_deepspeed(doc: dict) -> dict:
    """The same training as `opt_study_trial(doc)` with measurement off, written as the minimal
    DeepSpeed loop a user would write; returns per-step end times and durations."""
    import deepspeed

    from opt_study import optim
    from opt_study.workloads import make_workload

    spec = parse_study(doc)
    scale = spec.scale
    rank, world = distributed.rank(), distributed.world_size()
    torch.set_num_threads(scale.torch_threads)  # what run_trial sets for its worker
    torch.manual_seed(rank)
    wl = make_workload(spec.workload.type, spec.workload.params, 0)
    model = wl.build_model()
    opt = doc["optimizers"][0]
    hp = optim.resolve_hparams(opt["name"], opt["params"])
    assert opt["name"] == "adamw", "the plain loop builds AdamW itself"
    client = torch.optim.AdamW(
        model.parameters(),
        lr=hp["lr"],
        betas=(hp["beta1"], hp["beta2"]),
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        amsgrad=hp["amsgrad"],
    )
    config = {
        "train_micro_batch_size_per_gpu": scale.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": scale.micro_batch_size * world,
        "zero_optimization": {"stage": scale.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config, dist_init_required=False)
    gc.collect()
    distributed.barrier()
    ends, durations = [], []
    for step in range(spec.training.steps):
        t0 = time.perf_counter()
        batch = wl.train_batch(step, rank, scale.micro_batch_size)
        loss = wl.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        durations.append(time.perf_counter() - t0)
        ends.append(time.time())
    distributed.barrier()
    del engine, client, model
    gc.collect()
    return {"time_unix": ends, "step_time_s": durations}


def interleaved(variants: dict, repeats: int, warmup: int, label: str) -> list[dict]:
    """Run every variant `repeats` times, rotating the order each repeat so slow phases of
    foreign load fall on every variant alike. `variants[name](rep)` runs one training and returns
    rank 0's columns (None elsewhere). Returns rank 0's runs (empty elsewhere), each with the
    1-minute load average read just before it, steps/s over the window warmup..N-1 (the mean:
    every step counts, periodic probes included), 1 / the median interval between step ends
    (robust to bursts of foreign load, blind to anything that happens on a minority of steps),
    and the median intervals of measured and of unmeasured steps separately."""
    from common import load1, median, window_rate

    names = list(variants)
    runs = []
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            load = load1()
            cols = variants[name](rep)
            if distributed.rank() != 0:
                continue
            t = cols["time_unix"]
            gaps = [b - a for a, b in zip(t[warmup - 1 : -1], t[warmup:])]
            flags = (cols.get("measured") or [False] * len(t))[warmup:]
            runs.append(
                {
                    "rep": rep,
                    "variant": name,
                    "load1": load,
                    "steps_per_s": window_rate(t, warmup),
                    "steps_per_s_median": 1 / median(gaps),
                    "median_step_s": median(cols["step_time_s"][warmup:]),
                    "median_gap_unmeasured_s": median(g for g, m in zip(gaps, flags) if not m),
                    "median_gap_measured_s": median(g for g, m in zip(gaps, flags) if m),
                }
            )
            print(f"{label} {runs[-1]}", flush=True)
    return runs
