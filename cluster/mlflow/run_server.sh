#!/usr/bin/env bash
# MLflow tracking server on PostgreSQL without Docker, for a host that is not a study's driver
# (a service host of a SLURM site, a workstation): a private PostgreSQL (own data folder, listening
# on 127.0.0.1 only, initialised on first use) and `mlflow server` on it, proxying artifacts.
# It runs `opt-study mlflow-server` (opt_study/results/mlflow_server.py), which the cluster files
# start beside the driver by default; run it in the opt_study venv:
#
#   bash cluster/mlflow/run_server.sh              # foreground; Ctrl-C stops MLflow and PostgreSQL
#   # a study points at it with  study: {mlflow_uri: http://127.0.0.1:5000}
#
# Needs PostgreSQL's server programs (`apt-get install postgresql`; found in
# /usr/lib/postgresql/<version>/bin). As root, the database runs as the `postgres` (or `nobody`)
# account, which must reach MLFLOW_HOME (not under root's mode-700 home). Settings (environment variables):
#   MLFLOW_HOME       state folder: database, password, logs               [~/opt_study_mlflow]
#                     (one server per folder: a lock refuses a second one, on any host)
#   MLFLOW_ARTIFACTS  artifact store: a folder (e.g. /mnt/shared/mlflow-artifacts), s3://... or gs://...
#                                                                          [$MLFLOW_HOME/artifacts]
#   MLFLOW_HOST       bind address of the MLflow server                                  [127.0.0.1]
#   MLFLOW_PORT       its port                                                                [5000]
#   MLFLOW_WORKERS    its worker processes                                                      [2]
#   PG_PORT           the private PostgreSQL's port on 127.0.0.1                             [15432]
set -euo pipefail

MLFLOW_HOME=${MLFLOW_HOME:-$HOME/opt_study_mlflow}
command -v opt-study >/dev/null || { echo "error: opt-study not on PATH (activate the opt_study venv)" >&2; exit 2; }
exec opt-study mlflow-server \
  --home "$MLFLOW_HOME" \
  --artifacts "${MLFLOW_ARTIFACTS:-$MLFLOW_HOME/artifacts}" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" --pg-port "${PG_PORT:-15432}"
