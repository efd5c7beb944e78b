"""Muon under ZeRO 1-3 through the whole-tensor route (opt_study/optim/whole_tensor.py) vs Muon at
ZeRO-0: step time and the optimizer state's memory per rank (issue 18; a targeted run, not in
run_all.py).

`python benchmarks/bench_whole_tensor.py OUT.json [WORLD] [--opt NAME] [--gpu]` starts one torchrun job of WORLD ranks
(default 2; gloo on CPU, or nccl with `--gpu`) that runs, interleaved over REPEATS rounds, the real
`run_trial` of STEP_MODEL (benchmarks/common.py, about 1.9M parameters) for STEPS steps with
measurement off, at ZeRO 0, 1, 2 and 3, and writes per stage:

- the median step time over the steps after the first WARMUP of each run, median over rounds
  (`begin` to `end` of the step measurer: forward, backward, reduction and optimizer step);
- per rank, bytes of optimizer memory at the end: the rule's state (Muon's momentum, the AdamW
  group's moments; at ZeRO 1-3 only the owner's tensors), what the owners keep of their whole
  tensors between steps (whole-tensor route; 0: released after each step), and this rank's
  elements of DeepSpeed's fp32 master partitions (ZeRO 1-3; at ZeRO-0 fp32 the model's own
  weights are the masters). Every rank's numbers are kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import STEP_MICRO_BATCH, STEP_MODEL, VENV_BIN, child_env, load1, median  # noqa: E402

STAGES = (0, 1, 2, 3)
STEPS = 12
WARMUP = 2
REPEATS = 5
# `--opt NAME` times another optimizer the same way (AdamW: what ZeRO 1-3 cost an element-wise rule
# on this machine, to tell the route's overhead from the engine's)
OPT = sys.argv[sys.argv.index("--opt") + 1] if "--opt" in sys.argv else "muon"


def _bytes(state) -> int:
    return sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if hasattr(t, "numel"))


def optimizer_bytes(engine) -> dict:
    """This rank's optimizer memory (see the module docstring)."""
    from opt_study.optim.interface import _chain

    chain = list(_chain(engine.optimizer))
    wt = next((o for o in chain if getattr(o, "sees_whole_tensors", False)), None)
    if wt is not None:
        rule = _bytes(wt.rule.state) if wt.rule is not None else 0
        copies = sum(t.numel() * 4 for t in wt.full.values())  # 0: released between steps
        masters = sum((hi - lo) * 4 for _, lo, hi in wt._fragments())
        return {"rule_state": rule, "owner_copies": copies, "masters": masters}
    client = chain[-1]
    return {"rule_state": _bytes(client.state), "owner_copies": 0, "masters": 0}


def worker(out_path: str) -> None:
    import torch

    from opt_study import distributed
    from opt_study.measure.hook import StepMeasurer
    from opt_study.plan import TrialPlan
    from opt_study.trial.loop import run_trial
    from opt_study.validate import parse_study

    class Timer(StepMeasurer):
        last = None

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.times, Timer.last = [], self

        def begin(self, step):
            self.t0 = time.perf_counter()
            super().begin(step)

        def end(self, step, *a, **kw):
            row = super().end(step, *a, **kw)
            self.times.append(time.perf_counter() - self.t0)
            if step + 1 == self.total:
                self.memory = optimizer_bytes(self.engine)
            return row

    distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    world = distributed.world_size()
    runs: dict[int, list] = {s: [] for s in STAGES}
    memory: dict[int, list] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as storage:
        storage = distributed.broadcast_object(storage)
        for rep in range(REPEATS):
            order = STAGES[rep % len(STAGES) :] + STAGES[: rep % len(STAGES)]  # interleaved, rotated
            for s in order:
                loads.append(load1())
                spec = parse_study(
                    {
                        "study": {"name": f"wt{s}r{rep}", "storage": storage},
                        "workload": dict(STEP_MODEL),
                        "scale": {
                            "workers": world,
                            "zero_stage": s,
                            "micro_batch_size": STEP_MICRO_BATCH,
                            "launcher": "worker_group",
                            "gpus_per_worker": 1 if torch.cuda.is_available() else 0,
                        },
                        "training": {"steps": STEPS, "eval_every": STEPS, "checkpoint_every": 0},
                        "optimizers": [{"name": OPT}],
                        "measure": {"every": 0},
                    }
                )
                plan = TrialPlan(trial_id=f"s{s}r{rep}", label=OPT, optimizer=OPT, hparams={}, seed=0, index=0)
                run_trial(spec, plan, report=lambda r: None, measurer_cls=Timer)
                runs[s].append(median(Timer.last.times[WARMUP:]))
                memory[s] = distributed.all_gather_object(Timer.last.memory)
    if distributed.rank() == 0:
        result = {
            "world": world,
            "optimizer": OPT,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "model": STEP_MODEL,
            "steps": STEPS,
            "load1": loads,
            "stages": {
                s: {
                    "step_s_median": median(runs[s]),
                    "step_s_min": min(runs[s]),
                    "step_s_per_round": runs[s],
                    "per_rank": memory[s],
                }
                for s in STAGES
            },
        }
        Path(out_path).write_text(json.dumps(result, indent=1))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    out = sys.argv[1]
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    env = child_env()
    if "--gpu" in sys.argv:
        env.pop("DS_ACCELERATOR")
    cmd = [str(VENV_BIN / "python"), "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    cmd += ["--master_port", str(29500 + os.getpid() % 1000), __file__, "--worker", out, "--opt", OPT]
    subprocess.run(cmd, env=env, check=True)
    print(Path(out).read_text())


if __name__ == "__main__":
    main()
