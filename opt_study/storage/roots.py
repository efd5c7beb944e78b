"""Whether a local storage root can hold a study, decided by ``validate`` without writing.

A root that cannot work (a file, a read-only file system, a kernel pseudo file system such as
/proc, a name over the OS limit) would otherwise pass ``validate`` and fail ``run`` with a
traceback after Ray has started. The root need not exist: ``run`` creates it, so its nearest
existing ancestor is what must be a writable directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Kernel file systems that look like folders but hold no files a study could write.
PSEUDO_FS = {
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "mqueue",
    "binfmt_misc",
    "autofs",
    "efivarfs",
}
# Network and cluster file systems, where SQLite's locking is unreliable (https://www.sqlite.org/faq.html#q5,
# "SQLite uses reader/writer locks ... file locking of many NFS implementations is buggy"). AWS EFS,
# GCP Filestore and Azure Files mount as nfs4 or cifs.
SHARED_FS = {
    "nfs",
    "nfs4",
    "lustre",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "fuse.ceph",
    "glusterfs",
    "fuse.glusterfs",
    "gpfs",
    "beegfs",
    "fuse.sshfs",
    "fuse.juicefs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "9p",
    "virtiofs",
}
MOUNTS = Path("/proc/self/mounts")
# The longest name the study adds below the root (study <= 128, then `trial_id=<id>` and temp names).
DEEPEST_BELOW_ROOT = 400
_OCTAL_RE = re.compile(r"\\([0-7]{3})")


def storage_root_problem(root: Path) -> str | None:
    """None if a study folder can be created under the absolute path ``root``, else why not."""
    root = Path(root)
    problem = _length_problem(root)
    if problem:
        return problem
    existing = root
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == root else f"is under {str(existing)!r}, which is"
        return f"{what} not a directory"
    fs = filesystem_type(existing)
    if fs in PSEUDO_FS:
        return f"is on the kernel's {fs} file system, which holds no study files"
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError as e:
        return f"cannot be examined: {e.strerror or e}"
    if read_only:
        return f"is on a read-only file system ({str(existing)!r})"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{str(existing)!r} is not writable by this user"
    return None


def _length_problem(root: Path) -> str | None:
    name_max, path_max = 255, 4096  # Linux's NAME_MAX and PATH_MAX; pathconf where it answers
    probe = next((p for p in (root, *root.parents) if os.path.exists(p)), Path("/"))  # never raises
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        pass
    for part in root.parts:
        if len(os.fsencode(part)) > name_max:
            return f"has a path component of {len(os.fsencode(part))} bytes; the file system allows {name_max}"
    size = len(os.fsencode(str(root)))
    if size + DEEPEST_BELOW_ROOT > path_max:
        return f"is {size} bytes long; with the study's own names it would pass the {path_max}-byte path limit"
    return None


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (from the longest matching mount point in
    /proc/self/mounts), or None where that is unknown."""
    try:
        lines = MOUNTS.read_text().splitlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, fs = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fs = point, fields[2]
    return fs


def shared_filesystem(path: Path) -> str | None:
    """The type of the network/cluster file system (SHARED_FS) holding ``path`` or its nearest
    existing ancestor, or None for a local one (or where that is unknown)."""
    existing = Path(os.path.abspath(path))
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    fs = filesystem_type(existing)
    return fs if fs in SHARED_FS else None
