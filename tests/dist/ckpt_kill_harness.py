"""One rank dies while it writes its checkpoint partition, under
`torchrun --nproc_per_node 2 tests/dist/ckpt_kill_harness.py STORAGE NAME MODE OUT.json`.

MODE `kill`: rank 1, at the step-4 save, waits until rank 0 has written its files, writes half
of its own ZeRO partition and SIGKILLs itself (torchrun then ends rank 0). MODE `run`: the trial
runs to its end (a restart after the kill, or the clean reference); rank 0 writes the trial's
stored rows to OUT.json. tests/multirank/test_checkpoint_kill.py asserts on them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from opt_study import distributed
from opt_study.plan import TrialPlan
from opt_study.results.parquet import read_steps
from opt_study.trial.loop import run_trial

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the spec helpers
from specs import make_spec  # noqa: E402

PLAN = TrialPlan("t", "adamw", "adamw", {"lr": 0.01}, seed=5, index=0)


def die_while_writing_partition(tag: str) -> None:
    """Rank 1's partition write of `tag` is cut short by the process's own SIGKILL."""
    save = TorchCheckpointEngine.save

    def dying_save(self, state_dict, path):
        if f"/{tag}/" not in path or "zero_pp_rank_1_" not in path:
            return save(self, state_dict, path)
        rank0 = Path(path.replace("zero_pp_rank_1_", "zero_pp_rank_0_"))
        t0 = time.time()
        while not (rank0.is_file() and rank0.stat().st_size > 0) and time.time() - t0 < 60:
            time.sleep(0.05)
        time.sleep(0.5)  # rank 0 has written its part
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    TorchCheckpointEngine.save = dying_save


def main(storage: str, name: str, mode: str, out: str) -> None:
    spec = make_spec(
        storage,
        study={"name": name},
        workload={"type": "tiny_lm", "layers": 1, "heads": 2, "width": 32, "context": 16},
        scale={"workers": 2, "zero_stage": 2, "micro_batch_size": 4},
        training={"steps": 8, "eval_every": 2, "checkpoint_every": 2},
        optimizers=[{"name": "adamw", "params": {"lr": 0.01}}],
    )
    distributed.init_process_group("gloo")
    if mode == "kill" and distributed.rank() == 1:
        die_while_writing_partition("step-4")
    final = run_trial(spec, PLAN, report=lambda m: None)
    if distributed.rank() == 0:
        rows = [
            {k: r[k] for k in ("step", "attempt", "loss", "grad_norm")} for r in read_steps(spec.study_dir).to_pylist()
        ]
        Path(out).write_text(json.dumps({"final": final, "rows": rows}))
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:5])
