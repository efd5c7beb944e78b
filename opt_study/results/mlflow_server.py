"""An MLflow tracking server on PostgreSQL: what `opt-study mlflow-server` runs and the cluster
scripts start beside the study driver.

Why a server on a real database: the default store, SQLite under ``study.storage``, lives on
the cluster's shared file system, where SQLite's file locking is unreliable (NFS, EFS, Lustre);
and a tracking URI such as ``http://127.0.0.1:5000`` needs a server behind it on the node where
the driver runs. So ``serve`` runs

- a private PostgreSQL (``Postgres``): its own data folder ``<home>/pgdata``, created with
  ``initdb`` on first use, listening on 127.0.0.1 only, no Unix socket (a socket file on NFS
  does not work, and a socket path over 107 bytes is refused), password authentication
  (scram-sha-256) with a password made once and kept in ``<home>/db_password`` (mode 600); it
  reaches libpq and MLflow through ``PGPASSWORD``, never a command line that ``ps`` shows;
- ``mlflow server`` on it (``MlflowServer``), serving the artifacts itself
  (``--serve-artifacts``), so clients need no storage credentials;

or only ``mlflow server`` on a database the user names (``backend_store_uri``,
``postgresql://user@host/db``, password in ``PGPASSWORD``).

PostgreSQL refuses to run as root. Run as root (CI, containers), the database runs as an
unprivileged account (``postgres`` if the system has it, else ``nobody``) that owns
``<home>/pgdata``; ``home`` must then be reachable by that account.

One server per home at a time: PostgreSQL's own ``postmaster.pid`` guard only sees processes
of its own host, so two jobs of a shared file system could start two servers on one data
folder from two nodes and corrupt it. ``serve`` holds an exclusive POSIX lock
(``fcntl.lockf``, which NFSv4 and Lustre carry to the server) on ``<home>/server.lock``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DB_USER = "mlflow"
DB_NAME = "mlflow"
PG_DATA = "pgdata"
PASSWORD_FILE = "db_password"
LOCK_FILE = "server.lock"
_PG_BIN_ENV = "OPT_STUDY_PG_BIN"  # a folder with initdb and postgres, if not on PATH nor in Debian's place
# A stop mode -> the postmaster's signal (PostgreSQL's "Shutting Down the Server"): fast rolls
# back open transactions and exits cleanly; immediate quits at once, recovery from the WAL at
# the next start (what a crash or a killed node leaves).
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_RESTARTS = 10  # per serve(): past this a server that keeps dying is a problem for a person


class ServerError(RuntimeError):
    """The database or the MLflow server could not be set up or started; the message says why."""


def find_pg_bin() -> Path | None:
    """The folder with PostgreSQL's server programs (``initdb``, ``postgres``): ``$OPT_STUDY_PG_BIN``,
    else the one on PATH, else the newest of Debian/Ubuntu's ``/usr/lib/postgresql/<version>/bin``
    (the ``postgresql`` package does not put them on PATH). None if there is none."""
    candidates = []
    if os.environ.get(_PG_BIN_ENV):
        candidates.append(Path(os.environ[_PG_BIN_ENV]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version_key(p.parent.name), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def _version_key(name: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", name)) or (0,)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _wait(what: str, ready, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll ``ready()`` until true; ServerError if ``proc`` exits first (its log's tail) or on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise ServerError(f"{what} exited with code {proc.returncode} while starting; {log}:\n{tail}")
        if ready():
            return
        time.sleep(0.2)
    raise ServerError(f"{what} not ready after {timeout_s:.0f} s (log: {log})")


class Postgres:
    """A private PostgreSQL in ``home/pgdata`` on ``127.0.0.1:port`` (see the module docstring).

    ``init()`` creates the data folder and the password once; ``start()`` runs the postmaster
    as a child process and creates the ``mlflow`` database if it is missing; ``stop(mode)``
    ends it. ``uri`` is the SQLAlchemy URI for MLflow (no password in it)."""

    def __init__(self, home, port: int, run_as: str | None = None, pg_bin: Path | None = None):
        self.home, self.port = Path(home).resolve(), int(port)
        self.data, self.log = self.home / PG_DATA, self.home / "postgres.log"
        self.pg_bin = pg_bin or find_pg_bin()
        if self.pg_bin is None:
            raise ServerError(
                "PostgreSQL's server programs (initdb, postgres) not found: install them "
                "(Debian/Ubuntu: apt-get install postgresql) or set OPT_STUDY_PG_BIN to their folder"
            )
        # root: the database runs as an unprivileged account (the postmaster refuses root)
        if os.geteuid() == 0:
            run_as = run_as or ("postgres" if _account("postgres") else "nobody")
        self.account = _account(run_as) if run_as else None
        if run_as and self.account is None:
            raise ServerError(f"no such user {run_as!r} to run PostgreSQL as")
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    @property
    def password(self) -> str:
        return (self.home / PASSWORD_FILE).read_text().strip()

    def env(self) -> dict[str, str]:
        """The environment for a client of this database: libpq reads ``PGPASSWORD``."""
        return {**os.environ, "PGPASSWORD": self.password}

    def _run_kwargs(self) -> dict:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def init(self) -> bool:
        """Create the password and the data folder if missing; True if initdb ran."""
        self.home.mkdir(parents=True, exist_ok=True)
        pw = self.home / PASSWORD_FILE
        if not pw.is_file() or not pw.read_text().strip():
            fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
        if self.account is not None:
            self._give_home_to_account()
        if (self.data / "PG_VERSION").is_file():
            return False
        cmd = [str(self.pg_bin / "initdb"), "-D", str(self.data), "-U", DB_USER, "-E", "UTF8"]
        cmd += ["--auth=scram-sha-256", f"--pwfile={pw}", "--locale=C"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.home, **self._run_kwargs())
        if done.returncode != 0:
            raise ServerError(f"initdb failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return True

    def _give_home_to_account(self) -> None:
        """Root only: the database's account owns home (data, password, log) and must reach it."""
        uid, gid = self.account.pw_uid, self.account.pw_gid
        for path in [self.home, *self.home.rglob("*")]:
            if path.name != LOCK_FILE and not path.is_relative_to(self.home / "artifacts"):
                os.chown(path, uid, gid, follow_symlinks=False)
        for parent in self.home.parents:
            st = parent.stat()
            if not (st.st_mode & 0o001 or st.st_uid == uid or (st.st_gid == gid and st.st_mode & 0o010)):
                raise ServerError(
                    f"PostgreSQL runs as {self.account.pw_name!r}, which cannot reach {self.home}: "
                    f"{parent} has mode {st.st_mode & 0o777:o}; choose another home folder"
                )

    def start(self, timeout_s: float = 60) -> None:
        if port_in_use("127.0.0.1", self.port):
            raise ServerError(f"port 127.0.0.1:{self.port} is in use: choose another PostgreSQL port")
        cmd = [str(self.pg_bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        # loopback TCP only and no Unix socket (see the module docstring)
        cmd += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        log = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.home,
                start_new_session=True,  # a Ctrl-C of the terminal reaches serve(), which stops it in order
                **self._run_kwargs(),
            )
        finally:
            log.close()
        _wait("PostgreSQL", self._accepts, self.proc, self.log, timeout_s)
        self._create_database()

    def _connect(self, db: str, timeout_s: int = 3):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=DB_USER,
            password=self.password,
            dbname=db,
            connect_timeout=timeout_s,
        )

    def _accepts(self) -> bool:
        import psycopg2

        try:
            self._connect("postgres").close()
            return True
        except psycopg2.OperationalError:
            return False

    def _create_database(self) -> None:
        con = self._connect("postgres")
        try:
            con.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with con.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DB_NAME}" OWNER "{DB_USER}"')
        finally:
            con.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, mode: str = "fast", timeout_s: float = 60) -> None:
        """End the postmaster: ``fast`` (clean), ``smart`` (after clients leave) or ``immediate``
        (no checkpoint: like a crash; the next start recovers from the WAL)."""
        if not self.running():
            return
        self.proc.send_signal(_STOP_SIGNALS[mode])
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGQUIT)
            self.proc.wait(10)


class MlflowServer:
    """``mlflow server`` on ``backend_uri`` at ``host:port``, proxying artifacts to
    ``artifacts`` (a folder, ``s3://...`` or ``gs://...``), as its own process group (uvicorn
    runs the workers as children). ``env`` carries ``PGPASSWORD``."""

    def __init__(
        self,
        backend_uri: str,
        artifacts: str,
        host: str = "127.0.0.1",
        port: int = 5000,
        workers: int = 2,
        env: dict | None = None,
        log: Path | None = None,
    ):
        self.backend_uri, self.artifacts = backend_uri, str(artifacts)
        self.host, self.port, self.workers = host, int(port), int(workers)
        self.env = dict(env or os.environ)
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri]
        cmd += ["--artifacts-destination", self.artifacts, "--serve-artifacts"]
        cmd += ["--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        if self.host not in _LOOPBACK:
            # MLflow's DNS-rebinding guard answers only Host headers of loopback names by default;
            # a server bound on purpose to an internal address must accept its own name.
            cmd += ["--allowed-hosts", f"{self.host},{self.host}:{self.port},localhost,127.0.0.1"]
        return cmd

    def healthy(self) -> bool:
        return _healthy(self.url)

    def start(self, timeout_s: float = 180) -> None:
        if port_in_use("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host, self.port):
            raise ServerError(f"{self.host}:{self.port} is in use: another server, or choose another port")
        env = {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_ENABLE_TELEMETRY": "false"}
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if self.log:
                out.close()
        _wait("mlflow server", self.healthy, self.proc, self.log or Path("/dev/null"), timeout_s)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20) -> None:
        if not self.running():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the uvicorn workers too
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _account(name: str):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


class HomeLock:
    """The exclusive lock on ``<home>/server.lock`` (see the module docstring)."""

    def __init__(self, home):
        self.path = Path(home) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                holder = self.path.read_text().strip() or "another process"
                raise ServerError(f"{self.path.parent} is served already ({holder}); one server per home") from e
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the lock


def wait_healthy(url: str, timeout_s: float) -> bool:
    """True once ``url``/health answers 200 (polling), False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(url):
            return True
        time.sleep(0.5)
    return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def serve(
    home,
    artifacts: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    pg_port: int | None = None,
    workers: int = 2,
    backend_store_uri: str | None = None,
    run_as: str | None = None,
    out=sys.stdout,
) -> int:
    """Run the database (unless ``backend_store_uri`` names one) and ``mlflow server`` until
    SIGTERM/SIGINT, starting either again if it exits; then stop both, MLflow first. The exit
    code: 0 after a signal, 1 if a server could not start or died more than ``MAX_RESTARTS`` times."""
    home = Path(home).expanduser().resolve()
    artifacts = artifacts or str(home / "artifacts")
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    pg, ml = None, None
    try:
        with HomeLock(home):
            env = dict(os.environ)
            if backend_store_uri is None:
                pg = Postgres(home, pg_port or free_port(), run_as=run_as)
                if pg.init():
                    print(f"initialised PostgreSQL data folder {pg.data}", file=out, flush=True)
                pg.start()
                backend_store_uri, env = pg.uri, pg.env()
            ml = MlflowServer(backend_store_uri, artifacts, host, port, workers, env=env, log=home / "mlflow.log")
            ml.start()
            db = f"PostgreSQL 127.0.0.1:{pg.port}" if pg else _redacted(backend_store_uri)
            print(f"MLflow: {ml.url}  ({db}, artifacts {artifacts}, logs in {home})", file=out, flush=True)
            # Supervise: a database or server that dies (killed, out of memory) is started again,
            # so the study's queued writes find a server; MLflow's connection pool pings before use
            # (pool_pre_ping), so a restarted database needs no MLflow restart.
            restarts = 0
            while not stopping:
                for name, proc in (("PostgreSQL", pg), ("mlflow server", ml)):
                    if proc is None or proc.running() or stopping:
                        continue
                    restarts += 1
                    if restarts > MAX_RESTARTS:
                        print(f"error: {name} exited again; giving up (logs in {home})", file=sys.stderr, flush=True)
                        return 1
                    print(f"{name} exited ({proc.proc.returncode}); starting it again", file=sys.stderr, flush=True)
                    proc.start()
                time.sleep(0.5)
            return 0
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if ml is not None:
            ml.stop()
        if pg is not None:
            pg.stop("fast")
        for s, handler in old.items():
            signal.signal(s, handler)


def _redacted(uri: str) -> str:
    from opt_study.storage import uris

    return uris.redact(uri)
