"""The ONE module that reads or writes private DeepSpeed or torch state.

Everything here was measured on DeepSpeed 0.19.8 (pinned in pyproject.toml; docs/STACK.md §Reading
a rank's shard) and torch's ``nn.Module`` hook dictionaries. None of it is public API: a DeepSpeed
or torch upgrade re-checks this file only (tests/multirank/test_multirank.py compares every stage
against gathered references; tests/unit/test_deepspeed_state.py fails if another opt_study module
names one of these attributes). Each function says what it reads and why the measurement needs it.

Where this rank's fp32 shard lives, by ZeRO stage (shards.ShardView picks the mode):

- ZeRO-1/2, and BF16_Optimizer (bf16 at ZeRO-0/1): the fp32 master fragment behind
  ``p._hp_mapping`` (a ``tensor_fragment`` DeepSpeed attaches to every lp parameter; None on a rank
  that holds no element of it) and the reduced gradient fragment ``get_lp_grad_fragment``.
- ZeRO-3: the partition ``p.ds_tensor`` (padded to ceil(numel / W) elements), the full size
  ``p.ds_numel`` / ``p.ds_shape`` (``p.numel()`` is 0 while the parameter is released), and the
  fp32 partition through ``deepspeed.utils.safe_get_local_*``.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch

DEEPSPEED_VERSION = "0.19.8"  # the version every function below was checked against

EMPTY = torch.empty(0)

# torch.nn.Module's forward-hook dictionaries (torch >= 2.0 names; the last three may be absent).
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


# ------------------------------------------------------------------ ZeRO-1/2 and BF16_Optimizer
def hp_param_fragment(p) -> torch.Tensor:
    """This rank's fp32 master fragment of ``p`` (a live 1-D view; EMPTY if it holds none).

    ``p._hp_mapping.get_hp_fragment()``: DeepSpeed keeps the fp32 masters in flat partitions of
    the optimizer; the mapping is the only handle from a parameter to its slice of them."""
    m = p._hp_mapping
    return m.get_hp_fragment().view(-1) if m is not None else EMPTY


def hp_grad_fragment(p) -> torch.Tensor:
    """This rank's fp32 fragment of the reduced gradient of ``p`` (EMPTY if it holds none).

    Valid only between the accumulation-boundary backward and ``engine.step()``: ZeRO-1/2 keep the
    reduced gradient in ``averaged_gradients`` / IPG buffers that step() consumes, and
    ``get_lp_grad_fragment(p._index_in_param_group)`` is the only way to address it per parameter.
    BF16_Optimizer keeps a full accumulation buffer on each rank; the fragment is then narrowed to
    ``lp_fragment_address`` (the same elements as the master fragment)."""
    m = p._hp_mapping
    if m is None:
        return EMPTY
    g = m.get_lp_grad_fragment(p._index_in_param_group).view(-1)
    if g.numel() == p.numel() and g.numel() != m.lp_fragment_address.numel:
        g = g.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel)
    return g.float()


def hp_fragment_bounds(p) -> tuple[int, int]:
    """[start, stop) of this rank's master fragment within the flattened ``p``; (0, 0) if none.

    ``lp_fragment_address`` says which elements of the parameter the fragment holds: snapshots
    record it, and writing a point (ShardView.write_params) scatters fragments by it."""
    m = p._hp_mapping
    a = None if m is None else m.lp_fragment_address
    return (0, 0) if a is None else (a.start, a.start + a.numel)


def write_hp_param_fragment(p, frag: torch.Tensor) -> None:
    """Copy ``frag`` into this rank's fp32 master fragment of ``p`` (no-op if it holds none): the
    probe at p = x_t + sΔ_t and its restore set the masters the next step() reads."""
    if p._hp_mapping is not None:
        p._hp_mapping.get_hp_fragment().view(-1).copy_(frag)


# -------------------------------------------------------------------------------- ZeRO-3
def z3_local_param(p) -> torch.Tensor:
    """This rank's fp32 partition of ``p`` (padded; ``deepspeed.utils.safe_get_local_fp32_param``)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)


def z3_local_grad(p) -> torch.Tensor:
    """This rank's partition of the reduced gradient of ``p`` (padded; a live buffer step()
    changes, so callers clone what they keep; ``deepspeed.utils.safe_get_local_grad``)."""
    from deepspeed.utils import safe_get_local_grad

    return safe_get_local_grad(p)


def z3_numel(p) -> int:
    """The whole parameter's element count: ``p.ds_numel`` (``p.numel()`` is 0 while ZeRO-3
    has the parameter released). The tail of a partition past it is padding."""
    return p.ds_numel


def z3_shape(p) -> torch.Size:
    """The whole parameter's shape, ``p.ds_shape`` (``p.shape`` is (0,) while released)."""
    return p.ds_shape


def z3_partition_numel(p) -> int:
    """Elements of every rank's (padded) lp partition, ``p.ds_tensor.ds_numel``
    (DeepSpeed ``_aligned_size``: ceil(numel / W)); rank r holds [r*P, (r+1)*P)."""
    return p.ds_tensor.ds_numel


def z3_write_partition(p, frag: torch.Tensor) -> None:
    """Write ``frag`` into the first elements of this rank's lp partition ``p.ds_tensor``: the
    weights ZeRO-3's forward all-gathers (the probe point and its restore)."""
    p.ds_tensor.data.view(-1)[: frag.numel()].copy_(frag)


def z3_is_gathered(p) -> bool:
    """Whether ``p.data`` holds the whole parameter now (persistent below
    stage3_param_persistence_threshold, or still cached after a forward)."""
    return p.data.numel() == p.ds_numel


# ------------------------------------------------------------------------------ any stage
def full_numel(p) -> int:
    """The whole parameter's element count at any stage (``ds_numel`` under ZeRO-3)."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_shape(p) -> list[int]:
    """The whole parameter's shape at any stage (``ds_shape`` under ZeRO-3)."""
    return list(getattr(p, "ds_shape", p.shape))


def set_accumulation_boundary(engine, value: bool | None) -> None:
    """Force (True/False) or release (None) the engine's accumulation-boundary override.

    The probe replays step t's micro-batches and must reduce its gradient exactly where step t
    did; None resets the override, which is otherwise sticky (an undocumented value)."""
    engine.set_gradient_accumulation_boundary(value)


def restore_after_probe(engine, zero_stage: int) -> None:
    """Put the engine's gradient state back exactly as step() left it (buffers, counters,
    boundary) after the probe's extra forward/backward (docs/STACK.md §The same-batch probe,
    ablations; DeepSpeed 0.19.8).

    Dispatches on the stage DeepSpeed really runs. ZeRO-0/3: without zero_grad the probe's
    gradient leaks into the next step. ZeRO-1/2: the ZeRO optimizer's ``averaged_gradients`` and
    ``all_grad_tensors`` must be None again and ``micro_step_id`` -1, as step() leaves them.
    ZeRO-1 with bf16 is DeepSpeed's BF16_Optimizer: its zero_grad(set_to_none) clears its lp grads
    and zeroes its fp32 accumulation buffers, as its step() leaves them; it has no micro_step_id
    (setting one would add state that a run without the probe lacks).
    """
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else zero_stage
    if stage == 0:
        engine.zero_grad()
    else:
        zo = engine.optimizer
        zo.zero_grad(set_to_none=True)
        for k in list(getattr(zo, "averaged_gradients", {}) or {}):
            zo.averaged_gradients[k] = None
        if stage in (1, 2):
            for k in list(getattr(zo, "all_grad_tensors", {}) or {}):
                zo.all_grad_tensors[k] = None
            if hasattr(zo, "micro_step_id"):
                zo.micro_step_id = -1
    set_accumulation_boundary(engine, None)  # the override is sticky otherwise


# ------------------------------------------------------------------------- optimizer state
def client_optimizer(engine):
    """The torch optimizer that applies the update: ZeRO 1-3 and BF16_Optimizer wrap the client
    as ``engine.optimizer.optimizer``; at ZeRO-0 fp32 ``engine.optimizer`` is the client."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def adam_second_moment_hyper(engine) -> tuple[float, float, int] | None:
    """(β2, ε, k) of an Adam-family client optimizer, k its step count (torch Adam/AdamW keep
    ``state[p]["step"]``, after step t it is t + 1), or None when the optimizer keeps no
    ``exp_avg_sq`` (not Adam-family) or has not stepped. Read for the preconditioned sharpness:
    P = diag(√v̂) + ε with v̂ = v / (1 − β2^k) (Cohen et al. 2022, https://arxiv.org/abs/2207.14484)."""
    client = client_optimizer(engine)
    group = client.param_groups[0]
    state = next((st for st in client.state.values() if "exp_avg_sq" in st and "step" in st), None)
    if state is None or "betas" not in group:
        return None
    return float(group["betas"][1]), float(group["eps"]), int(float(state["step"]))


def slice_optim_state(engine, p, key: str) -> torch.Tensor | None:
    """The whole ``key`` state of ``p`` (ZeRO-0 fp32: the client's state is keyed by the model's
    own parameters), flattened; None if absent."""
    st = client_optimizer(engine).state.get(p, {})
    v = st.get(key)
    return v.view(-1) if torch.is_tensor(v) else None


def hp_optim_state_fragment(p, key: str) -> torch.Tensor | None:
    """This rank's fragment of the ``key`` state of ``p`` (ZeRO-1/2, BF16_Optimizer): the
    ``tensor_fragment.optim_fragment`` views DeepSpeed links after the first step(); EMPTY if the
    rank holds none of ``p``, None before the link or without the key."""
    m = p._hp_mapping
    if m is None:
        return EMPTY
    frag = getattr(m, "optim_fragment", None) or {}
    return frag[key].view(-1) if key in frag else None


def z3_local_optim_state(p, key: str) -> torch.Tensor | None:
    """This rank's (padded) partition of the ``key`` state of ``p`` (ZeRO-3,
    ``deepspeed.utils.safe_get_local_optimizer_state``); None without the key."""
    from deepspeed.utils import safe_get_local_optimizer_state

    try:
        return safe_get_local_optimizer_state(p, key)
    except (KeyError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------- torch module hooks
def _is_deepspeed_hook(fn) -> bool:
    fn = getattr(fn, "func", fn)  # functools.partial
    return (getattr(fn, "__module__", "") or "").startswith("deepspeed")


@contextmanager
def without_deepspeed_forward_hooks(module: torch.nn.Module):
    """Every submodule's forward hooks minus DeepSpeed's; the original dicts back afterwards.

    The fp32 re-evaluation (fp32eval.py) points ``p.data`` at fp32 tensors; ZeRO-3's own
    pre-forward gather / post-forward release would overwrite them with the bf16 gather. torch has
    no API to detach a hook it did not return a handle for, so the module's hook dictionaries
    (HOOK_DICTS) are replaced by filtered copies and restored, in their order; hooks of other
    origin stay."""
    saved = []
    for m in module.modules():
        dicts = {name: getattr(m, name) for name in HOOK_DICTS if hasattr(m, name)}
        drop = {k for k, fn in dicts.get("_forward_pre_hooks", {}).items() if _is_deepspeed_hook(fn)}
        drop |= {k for k, fn in dicts.get("_forward_hooks", {}).items() if _is_deepspeed_hook(fn)}
        if not drop:
            continue
        saved.append((m, dicts))
        for name, d in dicts.items():
            setattr(m, name, OrderedDict((k, v) for k, v in d.items() if k not in drop))
    try:
        yield
    finally:
        for m, dicts in saved:
            for name, d in dicts.items():
                setattr(m, name, d)


# ------------------------------------------------------------------------ checkpoint loading
def checkpoint_safe_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` at ZeRO 0-3, fp32/bf16; the two
    loss scalers under fp16). Each is a plain record (an Enum, a dataclass, an attribute holder)
    whose construction runs no code of the file's choosing, so the weights-only unpickler may
    build them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_weights_only_loads(engine) -> None:
    """Make every checkpoint read of ``engine`` a ``torch.load(weights_only=True)``.

    DeepSpeed 0.19.8 reads checkpoints only through ``engine.checkpoint_engine.load`` on the
    paths opt_study uses (module states through the state-dict loader, ZeRO partitions, the
    ZeRO-0 optimizer state; universal checkpoints, which call ``torch.load`` directly, are never
    enabled), and that method passes ``weights_only=False``: a planted pickle would run code
    (SECURITY.md). The instance's ``load`` is replaced by the weights-only one."""
    ce = engine.checkpoint_engine
    allowed = checkpoint_safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


# ---------------------------------------------------------------------- a reused rank process
def forget_process_group() -> None:
    """Drop DeepSpeed's module-level references to the process group a finished trial used, so a
    reused rank process (opt_study.study.pool) builds the next trial's engine on the next group.

    ``deepspeed.comm.comm.cdb`` (the TorchBackend wrapping torch.distributed) and the group
    caches of ``deepspeed.utils.groups`` (world, data/model/expert parallel groups, the device
    mesh) are globals that outlive an engine: left set, the next ``deepspeed.initialize`` would
    reuse a destroyed group. Each is reset to the value it has in a fresh process."""
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        getattr(groups, name, {}).clear()
    for name in (
        "_WORLD_GROUP",
        "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
        "mpu",
        "mesh_device",
        "_TENSOR_MODEL_PARALLEL_GROUP",
        "_MODEL_PARALLEL_GROUP",
        "_DATA_PARALLEL_GROUP",
        "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
        "_MPU_TENSOR_MODEL_PARALLEL_RANK",
    ):
        if hasattr(groups, name):
            setattr(groups, name, None)
