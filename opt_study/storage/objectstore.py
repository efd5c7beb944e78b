"""Storage roots: a local or NFS path, or an object-store URI (s3://, gs://).

A local or NFS root is used as it is. An object-store root is served through a *local working
copy*: the study's files are written under ``<cache>/remote/<hash of the URI>/`` exactly as
under a local root, and every committed file is uploaded at once (write-through), so the
object store always holds every committed result. Reads that must see other machines' work
pull from the object store first: the driver pulls the study (trial records, plan, steps) when
a command starts; a trial's ranks pull that trial's steps and checkpoints before resuming; the
replay command pulls the trial's snapshots.

Why a working copy and not pyarrow filesystems in every writer: DeepSpeed's checkpoints, torch
snapshots and SQLite need local files, and the local-root code (temp file + fsync + rename)
stays the one tested code path. An object-store PUT is atomic, so an uploaded file is seen
whole or not at all; commit markers (DeepSpeed's ``latest``, a snapshot's ``COMMITTED``) are
uploaded after the files they vouch for.

The working copy is found from any path inside it through a marker file at its root, so every
process (the driver, Ray Tune's trial actors, Ray Train's workers, torchrun children) mirrors
without extra wiring. Credentials come from the environment (``AWS_ACCESS_KEY_ID`` ...), never
from the study file; an endpoint goes in the URI's query, e.g.
``s3://bucket/studies?endpoint_override=10.0.0.5:9000&scheme=http`` (pyarrow's URI options).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from opt_study.storage import uris

SCHEMES = ("s3", "gs", "gcs")
MARKER = ".opt_study_remote.json"
CACHE_ENV = "OPT_STUDY_CACHE"
# Files up to this size are always fetched by a pull (commit markers, _START, stop files).
SMALL = 256
# A stop signal written by the driver reaches a rank on another node within this many seconds.
REMOTE_POLL_S = 2.0

_mirrors: dict[Path, "Mirror | None"] = {}
_fs_cache: dict[str, tuple] = {}
_last_poll: dict[str, float] = {}


def is_uri(storage: str) -> bool:
    """True for anything that starts like a URI (``scheme:``), so that ``s3:/bucket`` (one
    slash) is refused by check_uri rather than written to a local folder ``./s3:/bucket``;
    False for plain paths."""
    return uris.scheme(storage) is not None


def check_uri(storage: str) -> str | None:
    """None if ``storage`` is a usable object-store root, else what is wrong with it."""
    bad = uris.unsafe_char_problem(storage)
    if bad:
        return bad
    scheme = uris.scheme(storage)
    if scheme not in SCHEMES:
        return f"scheme {scheme!r} is not supported; use a path or one of " + ", ".join(
            f"{s}://bucket/prefix" for s in SCHEMES
        )
    if not storage[len(scheme) + 1 :].startswith("//"):
        return f"is not a URI: write {scheme}://bucket/prefix (two slashes)"
    parts = urlsplit(storage)
    # the storage string is stored in spec.yaml, MLflow params and logs
    secret = uris.secret_problem(storage, "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role")
    if secret:
        return secret
    if not parts.netloc:
        return "names no bucket (write s3://bucket/prefix)"
    if ".." in parts.path.split("/"):
        return "must not contain '..'"
    return None


def local_root(uri: str) -> Path:
    """The working copy of object-store root ``uri`` on this machine: ``$OPT_STUDY_CACHE`` (or
    ``~/.cache/opt_study``) ``/remote/<sha256(uri)[:16]>``."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "opt_study")
    return (base / "remote" / _digest(uri)).resolve()


def _digest(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def attach(uri: str) -> Path:
    """Create (once) the working copy of ``uri`` with its marker; return its root."""
    root = local_root(uri)
    marker = root / MARKER
    if not marker.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"uri": uri}))
        os.replace(tmp, marker)
        _mirrors.clear()  # a directory cached as "not mirrored" may now be
    return root


def filesystem(uri: str):
    """``(pyarrow FileSystem, base path inside it)`` for an object-store root (cached)."""
    if uri not in _fs_cache:
        from pyarrow import fs as pafs

        _fs_cache[uri] = pafs.FileSystem.from_uri(uri)
    return _fs_cache[uri]


def mirror_for(path) -> "Mirror | None":
    """The mirror whose working copy contains ``path``, or None (a local root)."""
    d = Path(os.path.abspath(path))
    seen = []
    for parent in (d, *d.parents):
        if parent in _mirrors:
            found = _mirrors[parent]
            break
        seen.append(parent)
        marker = parent / MARKER
        if marker.is_file():
            uri = json.loads(marker.read_text())["uri"]
            # Only a working copy's own root counts: a marker planted in some ancestor folder
            # (/tmp, a shared mount) must not redirect a local study to someone's bucket.
            if (parent.parent.name, parent.name) == ("remote", _digest(uri)):
                found = Mirror(parent, uri)
                break
    else:
        found = None
    for p in seen:
        _mirrors[p] = found
    return found


class Mirror:
    """One object-store root and its local working copy."""

    def __init__(self, local: Path, uri: str):
        self.local, self.uri = Path(local), uri
        self.fs, self.base = filesystem(uri)

    def remote(self, path) -> str:
        rel = Path(os.path.abspath(path)).relative_to(self.local)
        return "/".join([self.base.rstrip("/"), *rel.parts]) if rel.parts else self.base

    def push(self, path) -> None:
        """Upload one local file (or every file of a directory) to its place in the store.

        Each file goes to a hidden temporary key first and is then moved to its name: closing
        an S3 upload always completes it, so an upload cut short (an error, a signal) must
        never be able to land under the real name. The local file then takes the stored
        object's time, so later pulls see it as unchanged."""
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.name.startswith("."):
                continue  # temp files and locks are never results
            final = self.remote(f)
            tmp = f"{final.rsplit('/', 1)[0]}/.{f.name}.up-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                with open(f, "rb") as src, self.fs.open_output_stream(tmp) as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
                self.fs.move(tmp, final)
            except BaseException:
                self._discard(tmp)
                raise
            mtime = self.fs.get_file_info(final).mtime_ns
            if mtime is not None:
                os.utime(f, ns=(mtime, mtime))

    def _discard(self, key: str) -> None:
        try:
            self.fs.delete_file(key)
        except OSError:
            pass  # never written, or the store is unreachable: a hidden key readers skip

    def delete(self, path) -> None:
        """Delete a file or a whole prefix from the store (absent is fine)."""
        from pyarrow import fs as pafs

        rp = self.remote(path)
        info = self.fs.get_file_info(rp)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(rp)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(rp)

    def exists(self, path) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self.remote(path)).type != pafs.FileType.NotFound

    def listing(self, path) -> dict[str, tuple[int, int]]:
        """``{relative path: (size, mtime_ns)}`` of every object under ``path``."""
        from pyarrow import fs as pafs

        rp = self.remote(path)
        if self.fs.get_file_info(rp).type != pafs.FileType.Directory:
            return {}
        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(rp, recursive=True)):
            rel = info.path[len(rp) + 1 :]
            if info.type == pafs.FileType.File and not any(p.startswith(".") for p in rel.split("/")):
                mtime = info.mtime_ns if info.mtime_ns is not None else 0
                out[rel] = (info.size, mtime)
        return out

    def children(self, path) -> list[str]:
        """The names directly under ``path`` in the store (not recursive)."""
        from pyarrow import fs as pafs

        rp = self.remote(path)
        if self.fs.get_file_info(rp).type != pafs.FileType.Directory:
            return []
        return [i.base_name for i in self.fs.get_file_info(pafs.FileSelector(rp))]

    def pull(self, path, exact: bool = True, exclude: tuple[str, ...] = (), select=None) -> int:
        """Make the working copy of ``path`` (a directory) match the store; return the number
        of files downloaded. A file is fetched when missing, when its size or time differs, or
        when it is a small marker (``latest`` may change within the store's one-second time
        resolution at the same size). ``exact``: the store is the truth, and local files it
        does not hold are deleted (never hidden ones: temps and locks). Otherwise a local file
        newer than the stored one is kept (a writer here has just committed it and is
        uploading it). Top-level names in ``exclude`` are skipped on both sides, and so is every
        relative path for which ``select(rel)`` is false."""
        local = Path(path)

        def wanted(rel: str) -> bool:
            return rel.split("/", 1)[0] not in exclude and (select is None or select(rel))

        remote = {k: v for k, v in self.listing(local).items() if wanted(k)}
        fetched = 0
        for rel, (size, mtime) in remote.items():
            dst = local / rel
            st = dst.stat() if dst.is_file() else None
            if st is not None and not exact and st.st_mtime_ns > mtime:
                continue
            if st is not None and st.st_size == size and st.st_mtime_ns == mtime and size > SMALL:
                continue
            self._download(self.remote(dst), dst, mtime)
            fetched += 1
        if exact and local.is_dir():
            for f in local.rglob("*"):
                rel = f.relative_to(local).as_posix()
                if f.is_file() and not f.name.startswith(".") and rel not in remote and wanted(rel):
                    f.unlink(missing_ok=True)
        return fetched

    def _download(self, rp: str, dst: Path, mtime_ns: int) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            with self.fs.open_input_stream(rp) as src, open(tmp, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, dst)  # several ranks of one node may pull the same file: each
        finally:  # writes its own temp, and the renames agree
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- hooks used by the writers
def after_write(path) -> None:
    """Called by ``layout.atomic_write`` once ``path`` is committed locally."""
    m = mirror_for(Path(path).parent)
    if m is not None:
        m.push(path)


def after_remove(path) -> None:
    """Called by ``layout.remove_tree`` once ``path`` is deleted locally."""
    m = mirror_for(Path(path).parent)
    if m is not None:
        m.delete(path)


def push(path) -> None:
    """Upload files written by other libraries (DeepSpeed checkpoints); no-op on a local root."""
    after_write(path)


def pull(path, exact: bool = True, exclude: tuple[str, ...] = (), select=None) -> int:
    """Refresh the working copy of directory ``path`` from the store; 0 on a local root."""
    m = mirror_for(path)
    return m.pull(path, exact=exact, exclude=exclude, select=select) if m is not None else 0


def exists(path, poll: bool = True) -> bool:
    """Whether ``path`` exists here or in the store. ``poll``: asked every step for a signal
    another machine writes (a trial's stop file), so the store is asked at most every
    REMOTE_POLL_S seconds."""
    p = Path(path)
    if p.exists():
        return True
    m = mirror_for(p.parent)
    if m is None:
        return False
    now = time.monotonic()
    if poll and now - _last_poll.get(str(p), -REMOTE_POLL_S) < REMOTE_POLL_S:
        return False
    _last_poll[str(p)] = now
    return m.exists(p)


def ray_storage(path) -> dict:
    """``storage_path`` (and ``storage_filesystem`` for an object store) for Ray's RunConfig:
    Ray writes its own experiment state straight to the store."""
    m = mirror_for(Path(path).parent)
    if m is None:
        return {"storage_path": str(path)}
    return {"storage_path": m.remote(path), "storage_filesystem": m.fs}


# The study-level pull skips what only a trial's own ranks need (its checkpoints) and what
# Ray keeps for itself.
STUDY_EXCLUDE = ("checkpoints", "ray")


def pull_study(study_dir) -> int:
    """Before a study runs: make its working copy (records, plan, steps, snapshots, queue)
    exactly what the store holds."""
    return pull(study_dir, exact=True, exclude=STUDY_EXCLUDE)


def refresh_study(study_dir, parts: tuple[str, ...] | None = None) -> int:
    """Before reading a study that may still be running (status, query, report, replay):
    fetch what is new in the store, delete nothing (a file a trial on this machine has just
    committed may not be uploaded yet). ``parts``: only these top-level names of the study
    folder (what the reading command needs); None: all of it."""
    return pull(
        study_dir,
        exact=False,
        exclude=STUDY_EXCLUDE,
        select=None if parts is None else (lambda rel: rel.split("/", 1)[0] in parts),
    )
