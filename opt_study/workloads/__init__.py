"""Workload registry: a YAML `workload.type` names a (Workload class, frozen config class) pair.

The interface every workload implements is `opt_study.workloads.base.Workload`.
"""

from __future__ import annotations

from opt_study.workloads.base import Batch, Workload
from opt_study.workloads.gpt2 import GPT2Config, GPT2Workload
from opt_study.workloads.mlp_classify import MLPClassifyConfig, MLPClassifyWorkload
from opt_study.workloads.quadratic import QuadraticConfig, QuadraticWorkload
from opt_study.workloads.resnet_cifar import ResNetCifarConfig, ResNetCifarWorkload
from opt_study.workloads.tiny_lm import TinyLMConfig, TinyLMWorkload

WORKLOADS: dict[str, tuple[type[Workload], type]] = {
    "tiny_lm": (TinyLMWorkload, TinyLMConfig),
    "quadratic": (QuadraticWorkload, QuadraticConfig),
    "mlp_classify": (MLPClassifyWorkload, MLPClassifyConfig),
    "gpt2": (GPT2Workload, GPT2Config),
    "resnet_cifar": (ResNetCifarWorkload, ResNetCifarConfig),
}


def _lookup(type_name: str) -> tuple[type[Workload], type]:
    try:
        return WORKLOADS[type_name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown workload {type_name!r} (known: {', '.join(sorted(WORKLOADS))})") from None


def workload_config_class(type_name: str) -> type:
    """The frozen config dataclass of workload `type_name`."""
    return _lookup(type_name)[1]


def make_workload(type_name: str, cfg, seed: int) -> Workload:
    """Instantiate workload `type_name` with its config object `cfg` (None: all defaults) and `seed`."""
    cls, cfg_cls = _lookup(type_name)
    if cfg is None:
        cfg = cfg_cls()
    if not isinstance(cfg, cfg_cls):
        raise TypeError(f"workload {type_name!r} needs a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return cls(cfg, seed)


__all__ = [
    "Batch",
    "Workload",
    "WORKLOADS",
    "make_workload",
    "workload_config_class",
    "TinyLMConfig",
    "QuadraticConfig",
    "MLPClassifyConfig",
]
