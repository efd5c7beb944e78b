"""The cost of the noise floor's loss-scale capture (docs/METRICS.md §Noise floor), in isolation.

Run as `python benchmarks/bench_loss_scale.py [OUT.json]` (one process, one thread). On a
measured step the training forwards and the probe's forward run inside `lossscale.Capture`; this
times the common STEP_MODEL's forward + backward on one micro-batch with and without it, as the
minimum over interleaved repeats (robust to foreign load on a shared machine), and models the
ratio every-10 / off from it: a probe costs about one step, so 10 steps cost 11 + 2·extra/step.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from common import STEP_MICRO_BATCH, STEP_MODEL

REPEATS = 30


def main() -> None:
    from opt_study.measure.lossscale import Capture
    from opt_study.workloads import make_workload, workload_config_class

    torch.set_num_threads(1)
    params = {k: v for k, v in STEP_MODEL.items() if k != "type"}
    wl = make_workload(STEP_MODEL["type"], workload_config_class(STEP_MODEL["type"])(**params), 0)
    model = wl.build_model().train()
    batch = wl.train_batch(0, 0, STEP_MICRO_BATCH)

    def step(capture: bool) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if capture:
            with Capture(torch.device("cpu")) as cap:
                wl.loss(model, batch).backward()
            float(cap.total)
        else:
            wl.loss(model, batch).backward()
        return time.perf_counter() - t0

    times = {False: [], True: []}
    for i in range(REPEATS):
        for c in (i % 2 == 0, i % 2 == 1):  # interleaved, order alternating
            times[c].append(step(c))
    off, on = min(times[False]), min(times[True])
    extra = on - off
    out = {
        "fwd_bwd_s": off,
        "fwd_bwd_with_capture_s": on,
        "extra_s": extra,
        "extra_fraction": extra / off,
        "modelled_ratio_every10": 10 / (11 + 2 * extra / off),
        "modelled_ratio_every10_without_capture": 10 / 11,
    }
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
