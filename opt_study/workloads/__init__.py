"""Workload registry: a YAML `workload.type` names a (Workload class, frozen config class) pair.

The interface every workload implements is `opt_study.workloads.base.Workload`. A name not in
`WORKLOADS` is a plugin (opt_study.plugins): an import path `mypkg.models:MyWorkload` or a name an
installed package registers in the entry-point group `opt_study.workloads`; its class declares
its parameters' dataclass as `config_class`.
"""

from __future__ import annotations

import dataclasses

from opt_study import plugins
from opt_study.workloads.base import Batch, Workload
from opt_study.workloads.dataset_adapter import DatasetConfig, DatasetWorkload
from opt_study.workloads.gpt2 import GPT2Config, GPT2Workload
from opt_study.workloads.hf_causal_lm import HFCausalLMConfig, HFCausalLMWorkload
from opt_study.workloads.mlp_classify import MLPClassifyConfig, MLPClassifyWorkload
from opt_study.workloads.quadratic import QuadraticConfig, QuadraticWorkload
from opt_study.workloads.resnet_cifar import ResNetCifarConfig, ResNetCifarWorkload
from opt_study.workloads.tiny_lm import TinyLMConfig, TinyLMWorkload
from opt_study.workloads.torchvision_models import TorchvisionConfig, TorchvisionWorkload

WORKLOADS: dict[str, tuple[type[Workload], type]] = {
    "tiny_lm": (TinyLMWorkload, TinyLMConfig),
    "quadratic": (QuadraticWorkload, QuadraticConfig),
    "mlp_classify": (MLPClassifyWorkload, MLPClassifyConfig),
    "gpt2": (GPT2Workload, GPT2Config),
    "resnet_cifar": (ResNetCifarWorkload, ResNetCifarConfig),
    # adapters: a user's Dataset + model by import path; the optional extras [hf] and [vision]
    "dataset": (DatasetWorkload, DatasetConfig),
    "hf_causal_lm": (HFCausalLMWorkload, HFCausalLMConfig),
    "torchvision": (TorchvisionWorkload, TorchvisionConfig),
}


def _lookup(type_name: str) -> tuple[type[Workload], type]:
    """A built-in by name (nothing is imported); else a plugin: an import path `module:Class`
    or a name registered in the entry-point group `opt_study.workloads` (opt_study.plugins)."""
    if isinstance(type_name, str) and type_name in WORKLOADS:
        return WORKLOADS[type_name]
    if not isinstance(type_name, str):
        raise ValueError(f"unknown workload {type_name!r}")
    try:
        obj = plugins.load(type_name, plugins.WORKLOADS_GROUP)
    except ValueError as e:
        if plugins.is_import_path(type_name):
            raise
        known = sorted(WORKLOADS) + plugins.entry_point_names(plugins.WORKLOADS_GROUP)
        raise ValueError(f"unknown workload {type_name!r:.60} (known: {', '.join(known)}; or module:Class)") from e
    return _plugin_pair(type_name, obj)


def _plugin_pair(type_name: str, obj) -> tuple[type[Workload], type]:
    """(class, config class) of a plugin, after checking it keeps the Workload contract."""
    if not (isinstance(obj, type) and issubclass(obj, Workload)):
        raise ValueError(f"{type_name} is not a subclass of opt_study.Workload (got {type(obj).__name__})")
    missing = sorted(m for m in getattr(obj, "__abstractmethods__", ()))
    if missing:
        raise ValueError(f"{type_name} does not implement {', '.join(missing)}")
    cfg = obj.config_class
    if not (isinstance(cfg, type) and dataclasses.is_dataclass(cfg)):
        raise ValueError(f"{type_name} must set config_class to the dataclass of its parameters")
    if getattr(obj, "unit", None) not in ("tokens", "samples"):
        raise ValueError(f"{type_name}.unit must be 'tokens' or 'samples'")
    return obj, cfg


def workload_class(type_name: str) -> type[Workload]:
    """The Workload class of `type_name` (a built-in name or a plugin)."""
    return _lookup(type_name)[0]


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
    "workload_class",
    "workload_config_class",
    "TinyLMConfig",
    "QuadraticConfig",
    "MLPClassifyConfig",
]
