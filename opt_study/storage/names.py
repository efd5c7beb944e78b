"""The one rule for names that become path components: study names, labels, trial ids.

A hostile study file must not escape the storage root or collide with the Hive partition
syntax (``trial_id=...``), so a name is 1-128 characters from ``[A-Za-z0-9_.-]``, starts with a
letter or digit and holds no ``..``. ``fullmatch``: ``$`` would accept a trailing newline.
"""

from __future__ import annotations

import re

MAX_NAME = 128
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")
RULE = "1-128 characters from [A-Za-z0-9_.-], starting with a letter or digit, without '..'"


def is_safe_name(name: object) -> bool:
    """Whether ``name`` may be used as one path component."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as one path component, else raise ValueError naming ``what``."""
    if not is_safe_name(name):
        raise ValueError(f"invalid {what} {name!r}: use {RULE}")
    return name
