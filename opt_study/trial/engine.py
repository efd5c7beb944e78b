"""DeepSpeed engine construction: CPU (gloo, DS_ACCELERATOR=cpu) or GPU (nccl), ZeRO 0-3.

The client optimizer comes from `opt_study.optim` (a plain torch.optim object), so DeepSpeed never
JIT-compiles fused_adam. The learning rate is driven by the loop each step (no DeepSpeed
scheduler), which keeps the schedule a pure function of the step (opt_study.optim.lr_factor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from opt_study import distributed, optim
from opt_study.config import ScaleConfig
from opt_study.storage import build_locks


@dataclass(frozen=True)
class EngineInfo:
    device: torch.device
    world_size: int
    rank: int
    zero_stage: int
    precision: str


def ds_config(scale: ScaleConfig, world_size: int, grad_clip: float | None) -> dict:
    """The DeepSpeed JSON config for one trial (also stored with the trial for provenance)."""
    cfg = {
        "train_micro_batch_size_per_gpu": scale.micro_batch_size,
        "gradient_accumulation_steps": scale.grad_accum,
        "train_batch_size": scale.micro_batch_size * scale.grad_accum * world_size,
        "zero_optimization": {"stage": scale.zero_stage},
        # torch.optim optimizers are not on DeepSpeed's ZeRO allow-list but are element-wise
        # (opt_study.optim declares per optimizer which stages are correct and validate() checks).
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(grad_clip) if grad_clip else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scale.precision == "bf16":
        # fp32 gradient accumulation and reduction, so measured gradients are not bf16-rounded.
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    elif scale.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
        cfg["communication_data_type"] = "fp32"
    return cfg


def setup_process(scale: ScaleConfig) -> torch.device:
    """Threads, accelerator selection and the process group, before deepspeed is imported."""
    torch.set_num_threads(scale.torch_threads)
    # The trial's own scale decides the accelerator, whatever the launching shell exported
    # (the Makefile exports cpu for the quickstart and tests); accelerator: cpu computes on CPU
    # even where the trial reserved GPUs (ScaleConfig.device).
    os.environ["DS_ACCELERATOR"] = scale.device
    distributed.init_process_group(scale.dist_backend, single=scale.resolved_launcher == "in_process")
    if scale.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scale: ScaleConfig, grad_clip: float | None):
    """Wrap `model` and its client optimizer in a DeepSpeed engine on the current process group.

    Returns (engine, EngineInfo). The DeepSpeed config is ``ds_config(scale, world, grad_clip)``."""
    import deepspeed  # heavy (about 4 s); imported only where an engine is built

    world = distributed.world_size()
    config = ds_config(scale, world, grad_clip)
    # initialize loads DeepSpeed's JIT op under torch's build lock; one left by a killed rank
    # would make this wait forever (storage.build_locks)
    build_locks.clear_stale_locks()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    info = EngineInfo(
        device=engine.device,
        world_size=world,
        rank=distributed.rank(),
        zero_stage=scale.zero_stage,
        precision=scale.precision,
    )
    return engine, info


def attach_fragments(engine, client_opt, info: EngineInfo) -> None:
    """Tell a whole-tensor optimizer (opt_study.optim.whole_tensor) where this rank's fp32 master
    fragment of each parameter lives and which elements it holds: the measurement's shard view
    (opt_study.measure.shards, the one reader of private DeepSpeed state), in the order of
    `engine.module`'s trainable parameters, the order the optimizer was built with. A no-op for
    every other optimizer."""
    from opt_study.measure.shards import ShardView

    view = ShardView(engine, info.zero_stage, info.precision, info.rank, info.world_size)
    optim.attach_fragments(client_opt, lambda: list(zip(view.params(), *zip(*view.bounds()))))
