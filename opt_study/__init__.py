"""opt_study: a distributed study runner for deep-learning optimization research.

The Python API (README §Bring your own). Everything is imported lazily on first use, so
``import opt_study`` (and ``import opt_study.storage...``) stays light and imports no torch:

- ``Workload``: the interface a model + data pair implements (``opt_study.workloads.base``).
- ``OptimizerEntry``, ``ELEMENTWISE``, ``MODEL_TENSORS``: what an optimizer plugin declares
  (factory, defaults, search space, the (ZeRO stage, precision) pairs it is correct under).
- ``load_study(path)``: the validated spec of a study YAML file or study folder.
- ``run_study(spec_or_path, extend=False)``: run (or continue) a study; returns {"ran", ...}.
- ``open_results(study_dir)``: a ``Results`` accessor: ``steps()`` (last attempt wins),
  ``trials()``, ``replay()`` as pyarrow tables, ``query(sql)`` over the DuckDB views.
- ``WORKLOADS``, ``OPTIMIZERS``: the built-in registries; ``workload_class(name)``,
  ``optimizer_entry(name)`` resolve a built-in, an import path or an entry-point name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only: the runtime imports are lazy (__getattr__)
    from opt_study.api import Results, load_study, open_results, run_study
    from opt_study.optim import ELEMENTWISE, MODEL_TENSORS, OPTIMIZERS, OptimizerEntry, optimizer_entry
    from opt_study.workloads import WORKLOADS, Workload, workload_class

# name -> the module that defines it
_LAZY = {
    "Workload": "opt_study.workloads",
    "WORKLOADS": "opt_study.workloads",
    "workload_class": "opt_study.workloads",
    "OptimizerEntry": "opt_study.optim",
    "OPTIMIZERS": "opt_study.optim",
    "ELEMENTWISE": "opt_study.optim",
    "MODEL_TENSORS": "opt_study.optim",
    "optimizer_entry": "opt_study.optim",
    "load_study": "opt_study.api",
    "run_study": "opt_study.api",
    "open_results": "opt_study.api",
    "Results": "opt_study.api",
}

__all__ = [
    "ELEMENTWISE",
    "MODEL_TENSORS",
    "OPTIMIZERS",
    "OptimizerEntry",
    "Results",
    "WORKLOADS",
    "Workload",
    "load_study",
    "open_results",
    "optimizer_entry",
    "run_study",
    "workload_class",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'opt_study' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
