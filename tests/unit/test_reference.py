"""docs/reference.md is generated from the comments beside the config fields and cannot drift:
every field of every config class has a meaning, the committed file is the generator's output,
and every key the shipped studies and the README's study file use is in it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from opt_study.config import reference
from opt_study.config import spec as C
from opt_study.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reference.md"
CONFIG_OF = {name: cfg for name, (_, cfg) in WORKLOADS.items()}
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "examples").glob("*/study.yaml"))


def _keys_by_section(text: str) -> dict[str, set[str]]:
    """{section title: the keys of its table} read back from the rendered Markdown."""
    out, section = {}, None
    for line in text.splitlines():
        if m := re.match(r"## `(.+)`$", line):
            section = out.setdefault(m.group(1), set())
        elif section is not None and (m := re.match(r"\| `([^`]+)` \|", line)):
            section.add(m.group(1))
    return out


@pytest.mark.parametrize("cls", reference.all_classes(CONFIG_OF), ids=lambda c: c.__name__)
def test_every_config_field_has_a_meaning(cls):
    docs = reference.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs[f.name].strip()]
    assert not missing, f"{cls.__name__}: write a comment beside (or above) the field(s) {missing}"


def test_a_field_without_a_comment_is_caught():
    @dataclasses.dataclass(frozen=True)
    class Probe:
        # above, first line
        # above, second line
        a: int = 1  # after
        b: int = 2

        c: str = "x"  # only after

    assert reference.field_docs(Probe) == {
        "a": "above, first line above, second line after",
        "b": "",
        "c": "only after",
    }


def test_every_spec_section_and_nested_config_is_documented():
    """A new slice or nested config class in Spec must get a section in the reference too."""
    found, stack = set(), [C.Spec]
    while stack:
        for tp in typing.get_type_hints(stack.pop()).values():
            for inner in (tp, *typing.get_args(tp)):
                if (
                    dataclasses.is_dataclass(inner)
                    and inner.__module__ in (C.__name__, "opt_study.config.measure")  # the slices' modules
                    and inner not in found
                ):
                    found.add(inner)
                    stack.append(inner)
    assert found == set(reference.all_classes(CONFIG_OF)) - set(CONFIG_OF.values())


def test_committed_reference_is_the_generated_one():
    assert DOC.read_text() == reference.document(CONFIG_OF), "regenerate it: make reference"


def test_the_regeneration_command_prints_it():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_reference.py")], capture_output=True, text=True, check=True
    )
    assert out.stdout == DOC.read_text()


def _readme_study() -> str:
    """The README's annotated study file: its YAML block that starts with `study:`."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if b.startswith("study:"))


@pytest.mark.parametrize("path", SHIPPED + ["README.md"], ids=str)
def test_every_key_of_the_shipped_studies_is_in_the_reference(path):
    keys = _keys_by_section(DOC.read_text())
    data = yaml.safe_load(_readme_study() if path == "README.md" else path.read_text())
    used = []
    for section, value in data.items():
        if section == "optimizers":
            used += [("optimizers[]", k) for entry in value for k in entry]
        elif section == "workload":
            used.append(("workload", "type"))
            if value["type"] in CONFIG_OF:  # a plugin's keys are its own
                used += [(f"workload.type: {value['type']}", k) for k in value if k != "type"]
        else:
            used += _nested(section, value, keys)
    missing = [f"{s}.{k}" for s, k in used if k not in keys.get(s, ())]
    assert not missing, f"{path} uses keys docs/reference.md lacks: {missing}"
    assert len(used) > 10


def _nested(section: str, value: dict, keys: dict[str, set[str]]) -> list[tuple[str, str]]:
    out = []
    for k, v in value.items():
        out.append((section, k))
        if isinstance(v, dict) and f"{section}.{k}" in keys:
            out += _nested(f"{section}.{k}", v, keys)
    return out


def test_sections_are_read_back():
    keys = _keys_by_section(DOC.read_text())
    assert {"study", "workload", "optimizers[]", "scale", "training", "training.schedule", "search", "measure"} <= set(
        keys
    )
    assert {"max_concurrent_trials", "tpe_startup_trials"} <= keys["search"]
    assert {"torch_threads", "zero_stage"} <= keys["scale"]
    assert "log_every" in keys["training"] and "description" in keys["study"]
    assert {"layers", "width"} <= keys["workload.type: tiny_lm"]
