"""An MLflow SQLite store on a network file system is named by `validate` and `run` (a warning on
stderr, nothing refused): SQLite's locking is unreliable there (issue 16 item 5). The mount table
is a file in /proc/self/mounts's format, as the kernel writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from opt_study.cli.main import main as cli_main
from opt_study.storage import roots
from opt_study.validate import load_study, storage_warnings


def _mounts(tmp_path: Path, point: Path, fs: str) -> Path:
    table = tmp_path / "mounts"
    table.write_text(
        "overlay / overlay rw,relatime 0 0\n"
        "proc /proc proc rw,nosuid 0 0\n"
        f"server:/export {str(point).replace(' ', chr(92) + '040')} {fs} rw,relatime,vers=4.2 0 0\n"
    )
    return table


@pytest.mark.parametrize("fs", ["nfs4", "lustre", "cifs"])
def test_sqlite_store_on_a_network_file_system_is_named(tmp_path, monkeypatch, spec_factory, fs):
    shared = tmp_path / "shared dir"
    shared.mkdir()
    monkeypatch.setattr(roots, "MOUNTS", _mounts(tmp_path, shared, fs))
    study = spec_factory.write(tmp_path / "s.yaml", study={"storage": str(shared / "results")})
    (line,) = storage_warnings(load_study(study))
    assert line == (
        f"warning: {study}: study.storage: the MLflow SQLite store {shared / 'results' / 'mlflow.db'} is on a "
        f"{fs} file system, where SQLite's locking is unreliable; on a cluster run an MLflow server on "
        "PostgreSQL (cluster/README.md) and set study.mlflow_uri to it"
    )


def test_local_disk_or_a_server_uri_gives_no_warning(tmp_path, monkeypatch, spec_factory):
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(roots, "MOUNTS", _mounts(tmp_path, shared, "nfs4"))
    local = spec_factory.write(tmp_path / "local.yaml", study={"storage": str(tmp_path / "local")})
    assert storage_warnings(load_study(local)) == []
    server = spec_factory.write(
        tmp_path / "server.yaml", study={"storage": str(shared / "r"), "mlflow_uri": "http://127.0.0.1:5000"}
    )
    assert storage_warnings(load_study(server)) == []


def test_validate_prints_the_warning_and_still_passes(tmp_path, monkeypatch, spec_factory, capsys):
    shared = tmp_path / "nfs"
    shared.mkdir()
    monkeypatch.setattr(roots, "MOUNTS", _mounts(tmp_path, shared, "nfs"))
    study = spec_factory.write(tmp_path / "s.yaml", study={"storage": str(shared)})
    assert cli_main(["validate", str(study)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: {study}: study.storage: the MLflow SQLite store") and "nfs file" in err[0]
    assert err[1] == f"{study}: OK"
    assert not list(shared.iterdir())  # validate writes nothing
