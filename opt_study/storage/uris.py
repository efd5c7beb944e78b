"""The rules every URI in a study file passes: storage roots (opt_study.storage.objectstore) and
the MLflow tracking URI.

A URI from the study file is kept in ``spec.yaml``, printed by ``validate`` and ``run``, logged,
and pickled by Ray Tune into ``tuner.pkl`` with the spec, so it must never carry a secret: a
password in the user-info part (``user:secret@``) or a key in the query (``?token=``) is
refused, and credentials come from the environment the client libraries read. Control
characters and whitespace are refused too: a NUL in a tracking URI makes SQLAlchemy retry
forever, a newline forges log lines.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

# `scheme:` at the start of a string (two characters at least, so a Windows drive is no scheme)
SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
_UNSAFE_CHARS_RE = re.compile(r"[\x00-\x20\x7f]")
_USERINFO_RE = re.compile(r"(?<=://)[^/@?#]*@")
# Query keys that name a secret (pyarrow's access_key / secret_key / session_token, tokens, ...)
_SECRET_KEY_RE = re.compile(r"(?i)secret|passw|token|key|credential|signature")
_QUERY_PAIR_RE = re.compile(r"([?&;]([^=&#;]*)=)([^&#;]*)")

TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
TRACKING_ENV = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"


def scheme(text: str) -> str | None:
    """The URI scheme of ``text`` (lower case), or None for a plain path."""
    m = SCHEME_RE.match(text)
    return m.group(0)[:-1].lower() if m else None


def redact(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced by ``***@`` and the values of
    secret-looking query keys by ``***`` (for messages)."""
    text = _USERINFO_RE.sub("***@", text)
    return _QUERY_PAIR_RE.sub(lambda m: m.group(1) + ("***" if _SECRET_KEY_RE.search(m.group(2)) else m.group(3)), text)


def unsafe_char_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be used because of a control character or a space, else None."""
    m = _UNSAFE_CHARS_RE.search(uri)
    return None if m is None else f"contains the character {m.group(0)!r}; a URI holds no spaces or control characters"


def secret_problem(uri: str, env_hint: str, allow_user: bool = False) -> str | None:
    """Why ``uri`` would leak a credential (user-info, or with ``allow_user`` only user-info with
    a password; a secret-looking query key), else None. ``env_hint`` says where it goes instead."""
    parts = urlsplit(uri)
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
    if userinfo is not None and (":" in userinfo or not allow_user):
        return f"must not carry credentials (user:secret@); set them in the environment ({env_hint})"
    for k, _ in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_KEY_RE.search(k):
            return f"must not carry a secret in its query ({k}=...); set it in the environment ({env_hint})"
    return None


def tracking_uri_problem(uri: str) -> str | None:
    """None if ``uri`` is an MLflow tracking URI opt_study will use, else what is wrong with it.

    Allowed: a plain path (MLflow's file store), ``file:``, ``sqlite:`` and SQLAlchemy database
    URIs (``postgresql+psycopg2://``), ``http(s)://host``, ``databricks``. A user name alone may
    stay in a database URI (``postgresql://user@host/db``); its password may not."""
    if not uri:
        return "must be a non-empty URI or null (the default SQLite store under the storage root)"
    bad = unsafe_char_problem(uri)
    if bad:
        return bad
    s = scheme(uri)
    if s is None:
        return None  # a local path: MLflow's file store
    base = s.partition("+")[0]
    if base not in TRACKING_SCHEMES or (base != s and base not in ("postgresql", "mysql", "mssql")):
        return f"scheme {s!r} is not an MLflow tracking store; use one of " + ", ".join(TRACKING_SCHEMES)
    if base != "databricks" and not uri[len(s) + 1 :].startswith("//"):
        return f"is not a URI: write {s}://... (two slashes)"
    secret = secret_problem(uri, TRACKING_ENV, allow_user=base not in ("http", "https"))
    if secret:
        return secret
    parts = urlsplit(uri)
    if base in ("http", "https") and not parts.hostname:
        return f"names no host (write {base}://host:port)"
    if base == "sqlite" and parts.path in ("", "/"):
        return "names no database file (write sqlite:////absolute/path/mlflow.db); an in-memory store loses the study"
    return None
