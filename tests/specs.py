"""Study specs for tests: one small valid study (quadratic, 4 steps, one SGD) with overrides.

    make_spec(tmp_path)                                   # the default, validated (a Spec)
    make_spec(tmp_path, training={"steps": 40}, search={"asha": {...}})
    spec_doc(tmp_path, workload={"type": "tiny_lm", ...})  # the YAML document (a dict), unvalidated
    write_spec(tmp_path / "s.yaml", tmp_path, ...)         # that document as a YAML file

The first argument is the study's storage (``study.storage``) unless ``study`` overrides it.
Overrides are keyword arguments named after the top-level slices (study, workload, scale,
training, optimizers, search, measure). A mapping is merged key by key into the default,
recursively; anything else (a list such as ``optimizers``, a scalar, None) replaces the default
value. A ``workload`` naming another ``type`` replaces the whole workload (the default's
parameters belong to quadratic). ``base=`` starts from another document (e.g. a shipped config)
instead of DEFAULT.

Tests get it as the ``spec_factory`` fixture (tests/conftest.py), bound to their ``tmp_path``;
a torchrun harness under tests/dist/ can import it after putting tests/ on ``sys.path``. It needs
no pytest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from opt_study.config import Spec
from opt_study.validate import parse_study

DEFAULT: dict[str, Any] = {
    "study": {"name": "t"},
    "workload": {"type": "quadratic", "dim": 4, "cols": 2},
    "training": {"steps": 4, "eval_every": 2},
    "optimizers": [{"name": "sgd", "params": {"lr": 0.1}}],
}


def merged(base: Any, over: Any) -> Any:
    """``over`` deep-merged into ``base`` (neither is modified): mappings key by key, recursively;
    any other ``over`` value replaces ``base``."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merged(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def spec_doc(storage: str | Path, *, base: dict | None = None, **slices: Any) -> dict:
    """The study document: ``base`` (default DEFAULT) with ``study.storage = storage``, then
    ``slices`` merged in (see the module docstring)."""
    doc = merged(DEFAULT if base is None else base, {"study": {"storage": str(storage)}})
    for key, over in slices.items():
        cur = doc.get(key)
        if (
            key == "workload"
            and isinstance(over, dict)
            and isinstance(cur, dict)
            and over.get("type", cur.get("type")) != cur.get("type")
        ):
            doc[key] = copy.deepcopy(over)  # another workload: the default's parameters do not apply
        else:
            doc[key] = merged(cur, over) if key in doc else copy.deepcopy(over)
    return doc


def make_spec(storage: str | Path, *, file: str = "spec.yaml", base: dict | None = None, **slices: Any) -> Spec:
    """The validated Spec of ``spec_doc(storage, base=base, **slices)``; ``file`` is the name a
    ConfigError gives."""
    return parse_study(spec_doc(storage, base=base, **slices), file)


def write_spec(path: Path, storage: str | Path, *, base: dict | None = None, **slices: Any) -> Path:
    """``spec_doc(storage, ...)`` written as YAML to ``path`` (for load_study and the CLI)."""
    path.write_text(yaml.safe_dump(spec_doc(storage, base=base, **slices), sort_keys=False))
    return path


class SpecFactory:
    """The ``spec_factory`` fixture: the functions above with ``storage`` fixed.

    ``spec_factory(**slices)`` -> Spec, ``spec_factory.doc(**slices)`` -> dict,
    ``spec_factory.write(path, **slices)`` -> Path.
    """

    def __init__(self, storage: str | Path):
        self.storage = storage

    def __call__(self, *, file: str = "spec.yaml", base: dict | None = None, **slices: Any) -> Spec:
        return make_spec(self.storage, file=file, base=base, **slices)

    def doc(self, *, base: dict | None = None, **slices: Any) -> dict:
        return spec_doc(self.storage, base=base, **slices)

    def write(self, path: Path, *, base: dict | None = None, **slices: Any) -> Path:
        return write_spec(path, self.storage, base=base, **slices)
