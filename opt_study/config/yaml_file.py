"""Read a study's YAML file safely: `read_yaml` returns the document or raises one ConfigError.

YAML is parsed by a SafeLoader subclass (no Python object tags) with caps on the file size, the
number of aliases, the nesting depth and the size of integers, and duplicate keys are refused
(plain PyYAML keeps the last one silently). Capping aliases stops the classic "billion laughs"
at parse; `opt_study.config.load` also counts the values its walk visits. The file is opened
non-blocking and must be a regular file, so a FIFO or a device never hangs or floods the reader.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from opt_study.config import spec as C

MAX_ALIASES = 64
MAX_DEPTH = 32  # levels of nesting below the top mapping
MAX_INT_BITS = 4096  # ~1233 decimal digits: still printable in an error message
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, field: str, line: int):
        super().__init__(f"duplicate key {field} (line {line})")
        self.field, self.line = field, line


class _CappedLoader(yaml.SafeLoader):
    """SafeLoader that refuses alias bombs, nesting deeper than MAX_DEPTH and duplicate keys.

    The depth cap is applied while composing, before PyYAML's recursive composer can hit
    Python's recursion limit on a file of 1000 nested brackets.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases, self._depth = 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} YAML aliases (alias bombs are refused)")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_duplicate_keys(node)
        return node

    def construct_yaml_int(self, node):
        # `0x` + 5000 hex digits is a legal YAML int that Python cannot even print (str() stops at
        # 4300 digits): refuse it here. Smaller absurd ints reach the field checks, which name them.
        value = super().construct_yaml_int(node)
        if value.bit_length() > MAX_INT_BITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {value.bit_length()} bits (at most {MAX_INT_BITS})", node.start_mark
            )
        return value


_CappedLoader.add_constructor("tag:yaml.org,2002:int", _CappedLoader.construct_yaml_int)


# YAML 1.1 (PyYAML) reads `1e-3` as the STRING "1e-3": its float needs a dot and a signed
# exponent. YAML 1.2 and every user mean a number; resolve it as one (on this loader only).
_CappedLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_CappedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _check_duplicate_keys(root: yaml.Node) -> None:
    """Raise _DuplicateKey naming the dotted path of the first repeated key of any mapping.

    Keys are compared as (resolved tag, text); `<<` merge keys are YAML's override mechanism and
    are skipped. Each node is visited once, so shared (aliased) and cyclic nodes cost nothing.
    """
    stack, seen = [(root, "")], set()
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                at = f"{path}.{name}" if path else name
                if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG:
                    if (k.tag, name) in keys:
                        raise _DuplicateKey(at, k.start_mark.line + 1)
                    keys.add((k.tag, name))
                stack.append((v, at))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node.value))


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`, or ConfigError(file, "", why) for any unreadable file."""
    file = str(path)
    try:
        raw = _read_regular_file(path, C.MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise C.ConfigError(file, "", f"cannot read: {e.strerror or e}") from None
    if len(raw) > C.MAX_CONFIG_BYTES:
        raise C.ConfigError(file, "", f"file is over {C.MAX_CONFIG_BYTES} bytes; a study spec is a page of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise C.ConfigError(file, "", "not UTF-8 text (is it a binary file?)") from None
    try:
        return yaml.load(text, Loader=_CappedLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise C.ConfigError(file, e.field, f"duplicate key (line {e.line}); each key may appear once") from None
    except yaml.YAMLError as e:
        msg = str(e).replace("\n", " ")
        raise C.ConfigError(file, "", f"invalid YAML: {msg[:300]}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # PyYAML's constructors raise these on hostile scalars: int() past Python's 4300-digit
        # limit, a timestamp with month 13.
        msg = str(e).replace("\n", " ")
        raise C.ConfigError(file, "", f"invalid YAML value: {msg[:300]}") from None


def _read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``. Opened non-blocking and checked on
    the open descriptor (no race with a swapped path): opening a FIFO for reading would wait for
    a writer forever, and /dev/zero or a socket is no study file either."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
            raise OSError(f"not a regular file ({kind}); give the study's YAML file")
        os.set_blocking(fd, True)
        return f.read(limit)
