"""opt_study.measure.deepspeed_state is the only opt_study module that names private DeepSpeed or
torch state: a source scan (ast) of every other module, so the adapter cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

from opt_study.measure import deepspeed_state

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "opt_study"
ADAPTER = PKG / "measure" / "deepspeed_state.py"

# Private attributes of DeepSpeed 0.19.8 parameters and ZeRO optimizers, torch's nn.Module hook
# dictionaries, and the DeepSpeed helpers that address ZeRO-3 partitions.
PRIVATE = {
    # ZeRO-1/2 and BF16_Optimizer: a parameter's slice of the fp32 masters and gradients
    "_hp_mapping",
    "hp_fragment",
    "get_hp_fragment",
    "get_lp_grad_fragment",
    "lp_fragment_address",
    "_index_in_param_group",
    # ZeRO-3 partitions
    "ds_tensor",
    "ds_numel",
    "ds_shape",
    "safe_get_local_fp32_param",
    "safe_get_local_grad",
    # ZeRO optimizer internals
    "averaged_gradients",
    "all_grad_tensors",
    "micro_step_id",
    # the engine's checkpoint reader (replaced by a weights-only one)
    "checkpoint_engine",
    # torch.nn.Module's hook dictionaries
    *deepspeed_state.HOOK_DICTS,
    "_backward_hooks",
    "_backward_pre_hooks",
}

# (module, name) pairs allowed outside the adapter, each with its reason.
ALLOWED = {
    # optim sits below measure in the layer order (it may not import the adapter); it reads the
    # real shape of a ZeRO-3 parameter with a getattr fallback to guard layer-wise rules.
    ("opt_study/optim/interface.py", "ds_shape"),
}


def names_in(path: Path) -> set[str]:
    """Every private name a module's code uses: attributes (p._hp_mapping), string constants equal
    to one (getattr(zo, "averaged_gradients")), plain and imported names. Docstrings and comments
    may mention them."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= {a.name.split(".")[-1] for a in node.names}
    return found & PRIVATE


def test_only_the_adapter_names_private_deepspeed_and_torch_state():
    offenders = {}
    for path in sorted(PKG.rglob("*.py")):
        if path == ADAPTER:
            continue
        rel = path.relative_to(ROOT).as_posix()
        bad = {n for n in names_in(path) if (rel, n) not in ALLOWED}
        if bad:
            offenders[rel] = sorted(bad)
    assert not offenders, (
        "private DeepSpeed/torch state outside opt_study/measure/deepspeed_state.py "
        f"(add a named function there and call it): {offenders}"
    )


def test_the_scan_sees_what_it_must():
    """The adapter itself names them (the scan is not blind), and the allow-list is not stale."""
    assert {"_hp_mapping", "ds_tensor", "ds_numel", "averaged_gradients", "_forward_pre_hooks"} <= names_in(ADAPTER)
    for rel, name in ALLOWED:
        assert name in names_in(ROOT / rel), f"stale allow-list entry {(rel, name)}"


def test_adapter_documents_the_pinned_version():
    assert deepspeed_state.DEEPSPEED_VERSION in (ROOT / "pyproject.toml").read_text()
    public = [
        f
        for n, f in vars(deepspeed_state).items()
        if callable(f) and not n.startswith("_") and getattr(f, "__module__", "") == deepspeed_state.__name__
    ]
    assert public and all(f.__doc__ for f in public)
