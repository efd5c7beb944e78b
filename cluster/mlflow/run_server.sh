#!/usr/bin/env bash
# MLflow tracking server on PostgreSQL without Docker: a private PostgreSQL instance (its own data
# directory, port and socket, listening on 127.0.0.1 only), then `mlflow server` on it with a
# proxied artifact store. Run it on the host of the study driver (the Ray head node):
#
#   bash cluster/mlflow/run_server.sh              # foreground; Ctrl-C stops MLflow and PostgreSQL
#   # a study points at it with  study: {mlflow_uri: http://127.0.0.1:5000}
#
# Needs PostgreSQL's server binaries (initdb, pg_ctl: `apt-get install postgresql`) and the
# psycopg2 driver in the environment that has mlflow (`pip install psycopg2-binary`). Must not
# run as root (PostgreSQL refuses). Settings (environment variables):
#   MLFLOW_HOME       state directory, on LOCAL disk (PostgreSQL on NFS is unsafe)  [~/opt_study_mlflow]
#   MLFLOW_ARTIFACTS  artifact store: a directory (e.g. /mnt/shared/mlflow-artifacts), s3://... or gs://...
#                                                                            [$MLFLOW_HOME/artifacts]
#   MLFLOW_HOST       bind address of the MLflow server                                  [127.0.0.1]
#   MLFLOW_PORT       its port                                                                [5000]
#   MLFLOW_WORKERS    its worker processes                                                      [2]
#   PG_PORT           the private PostgreSQL's port (on 127.0.0.1)                           [15432]
set -euo pipefail

MLFLOW_HOME=${MLFLOW_HOME:-$HOME/opt_study_mlflow}
MLFLOW_ARTIFACTS=${MLFLOW_ARTIFACTS:-$MLFLOW_HOME/artifacts}
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
PG_PORT=${PG_PORT:-15432}
PGDATA_DIR=$MLFLOW_HOME/pgdata
SOCKET_DIR=$MLFLOW_HOME/socket

if [[ $(id -u) == 0 ]]; then
  echo "error: run as an ordinary user; PostgreSQL refuses to run as root" >&2
  exit 2
fi
# initdb/pg_ctl from PATH, else Debian/Ubuntu's versioned directory (newest version).
if ! command -v initdb >/dev/null; then
  PG_BIN=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$PG_BIN" ]] || { echo "error: PostgreSQL not found (apt-get install postgresql)" >&2; exit 2; }
  PATH=$PG_BIN:$PATH
fi
command -v mlflow >/dev/null || { echo "error: mlflow not on PATH (activate the opt_study venv)" >&2; exit 2; }
python -c "import psycopg2" 2>/dev/null || { echo "error: pip install psycopg2-binary" >&2; exit 2; }

mkdir -p "$MLFLOW_HOME" "$SOCKET_DIR"
chmod 700 "$MLFLOW_HOME"
# The database password: made once, kept in a file only this user reads, handed to libpq through
# the environment (never on a command line, where `ps` would show it).
if [[ ! -s $MLFLOW_HOME/db_password ]]; then
  (umask 077; python -c "import secrets; print(secrets.token_urlsafe(24))" > "$MLFLOW_HOME/db_password")
fi
export PGPASSWORD
PGPASSWORD=$(cat "$MLFLOW_HOME/db_password")

if [[ ! -f $PGDATA_DIR/PG_VERSION ]]; then
  initdb -D "$PGDATA_DIR" -U mlflow --auth=scram-sha-256 --pwfile="$MLFLOW_HOME/db_password" >/dev/null
fi
if ! pg_ctl -D "$PGDATA_DIR" status >/dev/null 2>&1; then
  pg_ctl -D "$PGDATA_DIR" -l "$MLFLOW_HOME/postgres.log" -w start \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $SOCKET_DIR"
fi
stop_postgres() { pg_ctl -D "$PGDATA_DIR" -m fast -w stop >/dev/null 2>&1 || true; }
trap stop_postgres EXIT

if ! psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1; then
  createdb -h 127.0.0.1 -p "$PG_PORT" -U mlflow mlflow
fi

echo "MLflow: http://${MLFLOW_HOST}:${MLFLOW_PORT}  (PostgreSQL 127.0.0.1:${PG_PORT}, artifacts ${MLFLOW_ARTIFACTS})"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_ENABLE_TELEMETRY=false \
  mlflow server \
    --backend-store-uri "postgresql+psycopg2://mlflow@127.0.0.1:${PG_PORT}/mlflow" \
    --artifacts-destination "$MLFLOW_ARTIFACTS" --serve-artifacts \
    --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS"
