"""The raw sums in ONE pass over the flat shard buffers: a fused C++ kernel for CPU fp32 inputs.

``sums.flat_sums`` runs one fp32 dot per sum and chunk, so each of ~9 dots re-reads its operands
(from L2); that in-cache arithmetic, not memory traffic, is most of its cost on CPU (benchmarks
RESULTS.md §3). ``fused_sums`` computes the same float64 [len(SUM_NAMES), n_groups] result with
csrc/fused_sums.cpp, which reads each element of x, g, Δ, g⁺, x₀, Δ_{t−1}, g_{t−1} once per run and
updates every sum from registers: fp32 products summed in fp32 lanes over blocks of 256 elements,
the blocks summed in float64 (error bound and ISA-independence: the .cpp file's header).

The extension is built with torch.utils.cpp_extension.load into $TORCH_EXTENSIONS_DIR (the
Makefile's .venv/torch_extensions) by ``opt_study.prebuild`` at install time, so trials only load
it (ninja finds it up to date; the build itself takes seconds: plain C++, no torch headers).
``available()`` loads it once per process; without a compiler (or on a build error) it warns
once and returns False, and flat_sums keeps its torch path. Portable flags only: -O3 and
-ffp-contract=off, no -march=native or fast-math; the kernel picks AVX2 or the x86-64 baseline
at load time (gcc target_clones) with bit-identical results. One thread, no OpenMP: the ranks
already use the cores.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from opt_study.measure.names import SUM_NAMES, VECTOR_NAMES, operand_vectors
from opt_study.measure.sum_layout import CHUNK, check_flat, empty_out, plan
from opt_study.storage import build_locks

NAME = "opt_study_fused_sums"
SOURCE = Path(__file__).with_name("csrc") / "fused_sums.cpp"
CFLAGS = ["-O3", "-ffp-contract=off", "-Wno-psabi"]
ENV = "OPT_STUDY_FUSED_SUMS"  # "0" forces sums.flat_sums onto its torch path

# Presence bit of each optional vector, as csrc/fused_sums.cpp numbers them (x is always read).
_BITS = {"g": 1, "delta": 2, "g_plus": 4, "x0": 8, "delta_prev": 16, "g_prev": 32}

_lock = threading.Lock()
_state: dict = {}  # "kernel" (the C entry point or None), "error", "load_s"
calls = 0  # kernel calls in this process (tests assert that dispatch reaches the kernel)


def enabled() -> bool:
    """False when the environment variable OPT_STUDY_FUSED_SUMS is "0" (read at every call)."""
    return os.environ.get(ENV, "1").strip() != "0"


def load(verbose: bool = False):
    """The kernel's C entry point (a ctypes function), building the library first if needed;
    None if it cannot be built or loaded (the reason is in ``error()``, warned once). Runs at
    most once per process."""
    with _lock:
        if "kernel" not in _state:
            t0 = time.perf_counter()
            try:
                _state["kernel"] = _build_and_open(verbose)
            except Exception as e:  # no compiler, no ninja, a compile error: the torch path works
                _state["kernel"], _state["error"] = None, f"{type(e).__name__}: {e}"
                lines = [ln.strip() for ln in _state["error"].splitlines() if ln.strip()]
                why = lines[0][:160] + (f" ... {lines[-2][:160]}" if len(lines) > 2 else "")
                warnings.warn(
                    f"opt_study: fused measurement sums unavailable, using the torch "
                    f"path ({why}; fused_sums.error() has the full message)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _state["load_s"] = time.perf_counter() - t0
        return _state["kernel"]


def _build_and_open(verbose: bool):
    """Build (ninja: a no-op when up to date) and open the library; check its layout against
    names.py (a kernel built from an older .cpp with another N_SUMS / N_VECS is refused)."""
    from torch.utils.cpp_extension import load as load_ext

    build_locks.clear_stale_locks()  # a lock left by a killed loader would hang load_ext forever
    # is_python_module=False: a plain shared library with a C entry point (no pybind, no torch
    # headers to compile), opened with ctypes, which releases the GIL during the call.
    path = load_ext(name=NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, is_python_module=False, verbose=verbose)
    lib = ctypes.CDLL(path)
    layout = lib.opt_study_fused_sums_layout
    layout.restype, layout.argtypes = ctypes.c_int64, [ctypes.c_int64]
    if (layout(0), layout(1)) != (len(SUM_NAMES), len(VECTOR_NAMES)):
        raise RuntimeError(
            f"{path} computes {layout(0)} sums of {layout(1)} vectors; expected "
            f"{len(SUM_NAMES)} of {len(VECTOR_NAMES)} (stale build?)"
        )
    frag = lib.opt_study_fragment_sums
    frag.restype = ctypes.c_int64
    frag.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    frag.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    _state["fragments"] = frag
    fn = lib.opt_study_fused_sums
    fn.restype = ctypes.c_int64
    fn.argtypes = [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return fn


def available() -> bool:
    """Whether the fused kernel can run in this process (builds or loads it on the first call)."""
    return load() is not None


def error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried)."""
    return _state.get("error")


def supports(present: Mapping[str, Tensor]) -> bool:
    """Whether the kernel takes these vectors: all fp32, contiguous and on the CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in present.values())


def fused_sums(
    vectors: Mapping[str, Tensor | None],
    runs: Sequence[tuple[int, int, int]],
    n_groups: int,
    chunk: int | None = None,
    only: Collection[str] | None = None,
) -> Tensor:
    """``sums.flat_sums`` computed by the fused kernel: the same float64 [len(SUM_NAMES),
    n_groups] result (a sum whose vectors are missing, or not in ``only``, is NaN; a group no run
    covers sums to 0), the same validation errors. ``chunk`` is accepted for the signature and
    validated, but the kernel's blocking is fixed. Requires ``available()`` and CPU fp32
    contiguous vectors (``supports``); raises RuntimeError otherwise."""
    present, n, wanted = check_flat(vectors, runs, n_groups, CHUNK if chunk is None else chunk, only)
    kernel = load()
    if kernel is None:
        raise RuntimeError(f"fused sums unavailable: {error()}")
    if not supports(present):
        raise RuntimeError(
            "fused sums need fp32 contiguous CPU vectors; got "
            + ", ".join(f"{k}: {t.dtype} on {t.device}" for k, t in present.items())
        )
    out = empty_out(wanted, n_groups, torch.device("cpu"))
    computable, missing, terms = plan(wanted, tuple(k for k in VECTOR_NAMES if k in present))
    held = sorted({g for g, _, _ in runs})
    if missing and held:
        out[torch.tensor(missing)[:, None], torch.tensor(held)[None, :]] = float("nan")
    if not computable or not runs:
        return out
    # read only the vectors the wanted sums need (x always: the kernel's sq_param is free)
    needed = {k for a, b in terms for name in (a, b) for k in operand_vectors(name)}
    mask = sum(bit for k, bit in _BITS.items() if k in needed)
    ptrs = (ctypes.c_void_p * 7)(
        present["x"].data_ptr(), *(present[k].data_ptr() if k in needed else None for k in _BITS)
    )
    table = torch.tensor(runs, dtype=torch.int64).reshape(-1, 3)
    per_group = torch.zeros(n_groups, len(SUM_NAMES), dtype=torch.float64)
    global calls
    calls += 1
    rc = kernel(mask, ptrs, n, table.data_ptr(), table.shape[0], n_groups, per_group.data_ptr())
    if rc != 0:  # check_flat validated the runs: a failure here is a bug, never a silent zero
        raise RuntimeError(f"fused sums kernel rejected its input (code {rc})")
    out[computable] += per_group.T[computable]
    return out


def fragment_sums(
    frags: Sequence[Tensor], runs: Sequence[tuple[int, int, int]], n_groups: int, kept: Tensor | None = None
) -> Tensor | None:
    """The every-step norms of an unmeasured step read straight from the engine's fragments,
    with no flat copy: float64 [len(SUM_NAMES), n_groups], NaN but for the sums computed. None
    when the kernel cannot take them (not built, OPT_STUDY_FUSED_SUMS=0, or a fragment that is
    not fp32, contiguous and on the CPU): the caller then copies and takes ``flat_sums``.

    ``runs`` are ``sums.group_runs`` over the fragments laid back to back (shards.FlatShard).
    Without ``kept``: the fragments are g_t, and sq_grad is computed. With ``kept`` (x_t, one
    flat fp32 buffer in that layout): the fragments are x_{t+1}; sq_update = ‖x_{t+1} − x_t‖²
    and sq_param = ‖x_t‖² are computed, and ``kept`` is overwritten with x_{t+1}, in one pass.
    Each sum is bit-for-bit ``fused_sums`` of the same vectors flattened (tested): the same
    blocks and lanes, each block gathered from the fragments into cache first."""
    present = {f"f{i}": t for i, t in enumerate(frags)}
    if kept is not None:
        present["kept"] = kept
    if not (enabled() and supports(present) and available()):
        return None
    sizes = [t.numel() for t in frags]
    n = sum(sizes)
    if kept is not None and (kept.dim() != 1 or kept.numel() != n):
        raise ValueError(f"kept must be 1-D with the fragments' {n} elements, got shape {tuple(kept.shape)}")
    names = ("sq_update", "sq_param") if kept is not None else ("sq_grad",)
    out = empty_out(set(names), n_groups, torch.device("cpu"))
    cols = [SUM_NAMES.index(k) for k in names]
    ptrs = (ctypes.c_void_p * max(len(frags), 1))(*(t.data_ptr() if t.numel() else None for t in frags))
    off = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64)
    table = torch.tensor(runs, dtype=torch.int64).reshape(-1, 3)
    per_group = torch.zeros(n_groups, len(SUM_NAMES), dtype=torch.float64)
    mode, kept_ptr = (1, kept.data_ptr()) if kept is not None else (0, None)
    rc = _state["fragments"](
        mode,
        ptrs,
        off.data_ptr(),
        len(frags),
        kept_ptr,
        table.data_ptr(),
        table.shape[0],
        n_groups,
        per_group.data_ptr(),
    )
    if rc != 0:
        raise RuntimeError(f"fragment sums kernel rejected its input (code {rc})")
    out[cols] += per_group.T[cols]
    return out
