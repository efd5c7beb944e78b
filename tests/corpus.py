"""The hostile YAML corpus (tests/bad_configs/) and the bad inputs generated at test time, shared by
tests/unit/test_config.py (the loader) and tests/e2e/test_cli_validate.py (the CLI). Each corpus
file's first line names the field its error must name: `# expect: <field>` (`<top>`: the file)."""

from __future__ import annotations

import random
from pathlib import Path

from opt_study.config import MAX_CONFIG_BYTES

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((ROOT / "tests" / "bad_configs").glob("*.yaml"))


def expected_field(path: Path) -> str:
    """The field named by the corpus file's first line; "" (ConfigError's `<top>`) for the file."""
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <field>'"
    field = first.removeprefix("# expect: ").strip()
    return "" if field == "<top>" else field


def generated_bad_files(d: Path) -> dict[str, Path]:
    """Bad inputs not worth committing: empty, binary, over the size cap, a directory, missing."""
    files = {
        "empty": d / "empty.yaml",
        "binary": d / "binary.yaml",
        "huge": d / "huge.yaml",
        "directory": d / "adir.yaml",
        "missing": d / "missing.yaml",
        "binary_utf8": d / "binary_utf8.yaml",
    }
    files["empty"].write_bytes(b"")
    files["binary"].write_bytes(random.Random(1234).randbytes(4096))
    # valid UTF-8, but control characters YAML refuses
    files["binary_utf8"].write_bytes(bytes(random.Random(99).randrange(0, 32) for _ in range(512)))
    line = b"# " + b"x" * 1021 + b"\n"
    files["huge"].write_bytes(b"study: {name: big}\n" + line * (MAX_CONFIG_BYTES // len(line) + 1))
    files["directory"].mkdir()
    return files
