"""Build DeepSpeed's JIT-compiled CPU op once, in one process, at install time.

DeepSpeed compiles `deepspeed_shm_comm` with gcc on the first CPU `initialize` (about 60 s) into
$TORCH_EXTENSIONS_DIR. If many trial workers start at once, they queue on torch's file lock; if a
compiling process is killed, its lock is left behind and every later trial waits on it forever.
Building it here (`make install`) means trials only ever load the finished op; a lock left by a
rank killed while loading is cleared before each load (opt_study.storage.build_locks).

The fused measurement-sums kernel (opt_study/measure/fused_sums.py, a few seconds of gcc) is built
first, the same way into the same directory. If that build fails (no compiler, an unsupported
platform), this prints why and goes on: sums.flat_sums then keeps its torch path.
"""

from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from opt_study.storage import build_locks

    build_locks.clear_stale_locks()  # a killed earlier build would make this wait forever
    build_fused_sums()
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    print("deepspeed_shm_comm:", "ready" if op is not None else "not used on this platform")
    return 0


def build_fused_sums() -> bool:
    """Build (or find up to date) the fused sums kernel; print the outcome, never raise."""
    import time
    import warnings

    from opt_study.measure import fused_sums

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is printed below instead
        ok = fused_sums.available()
    if ok:
        print(f"{fused_sums.NAME}: ready ({time.perf_counter() - t0:.1f} s)")
    else:
        print(f"{fused_sums.NAME}: build failed, measurement sums use the torch path: {fused_sums.error()}")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
