"""Build DeepSpeed's JIT-compiled CPU op once, in one process, at install time.

DeepSpeed compiles `deepspeed_shm_comm` with gcc on the first CPU `initialize` (about 60 s) into
$TORCH_EXTENSIONS_DIR. If many trial workers start at once, they queue on torch's file lock; if a
compiling process is killed, its lock is left behind and every later trial waits on it forever.
Building it here (`make install`) means trials only ever load the finished op.
"""
from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    print("deepspeed_shm_comm:", "ready" if op is not None else "not used on this platform")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
