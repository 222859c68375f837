#!/usr/bin/env bash
# A real three-node Ray cluster on this one machine: a head and two worker nodes, each its own
# raylet with its own ports and a custom resource naming it.
#
#   cluster/local.sh up       start the head, then worker_a and worker_b; print how to use them
#   cluster/local.sh status   `ray status` of this cluster (exit 3 when it is down)
#   cluster/local.sh down     stop this cluster's processes, and only those
#
# Use it:
#   cluster/local.sh up
#   source /tmp/bubogpt-ray-29000/env.sh          # RAY_ADDRESS + this cluster's auth token
#   .venv/bin/ray job submit --working-dir . -- .venv/bin/python -m workflows.cli data prepare ...
#
# Nodes (logical CPUs / custom resources):
#   head      0 CPUs, {"head": 1}       runs the GCS, dashboard, Jobs API and job drivers only,
#                                       like a KubeRay head with num-cpus 0
#   worker_a  $WORKER_CPUS, {"worker_a": 1}
#   worker_b  $WORKER_CPUS, {"worker_b": 1}
# With the head at 0 CPUs every task and actor of a job runs on a worker node, so a job whose
# work needs more CPUs than one worker has must use both.
#
# Knobs (environment variables):
#   BUBOGPT_LOCAL_PORT_BASE        first port of the block the cluster uses (default 29000); it
#                                  uses BASE .. BASE+399, so two clusters need bases 400 apart.
#                                  Keep it under Linux's ephemeral range (32768+), where outgoing
#                                  connections take their ports, and off Ray's defaults (6379,
#                                  8265, 10001, workers 10002-19999) that a plain ray.init uses
#   BUBOGPT_LOCAL_TEMP_DIR         the cluster's folder (default /tmp/bubogpt-ray-$BASE): the auth
#                                  token, env.sh, and each node's Ray temp dir (head/, worker_a/,
#                                  worker_b/: logs under */session_latest/logs); keep it short, Ray's
#                                  Unix socket paths must fit in 107 bytes
#   BUBOGPT_LOCAL_WORKER_CPUS      logical CPUs per worker node (default 2). A training job needs
#                                  CPUs beyond its workers' for its Ray Data reads: with N CPUs per
#                                  node, `train --num-workers 2 --cpus-per-worker C` puts one worker
#                                  on each node when 2C > N, and leaves N - C per node for data
#   BUBOGPT_LOCAL_OBJECT_STORE_MB  object store per node in MiB (default 256)
#   RAY                            the ray executable (default: the project's .venv/bin/ray)
#
# Addresses: every address given to Ray here is loopback (127.0.0.1) and the dashboard / Jobs API
# listens on loopback only. Ray itself names a node by this machine's interface address (it maps
# 127.0.0.1 to it on purpose), so `ray status` shows that address; all traffic stays on the machine.
#
# Authentication: the cluster runs with Ray token authentication (RAY_AUTH_MODE=token) and its own
# token in $TEMP_DIR/auth_token, set explicitly so the nodes agree whatever ~/.ray/auth_token
# holds. Clients: `source $TEMP_DIR/env.sh`, or send the header "Authorization: Bearer <token>".
#
# Why not `ray stop`: it stops every Ray on the machine (other test sessions, other users').
# `down` signals, by process id, only the processes whose command line names this cluster's temp
# dir (every Ray process of the cluster carries it: --temp-dir, --session-dir or its log dir).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
BASE="${BUBOGPT_LOCAL_PORT_BASE:-29000}"
TEMP_DIR="${BUBOGPT_LOCAL_TEMP_DIR:-/tmp/bubogpt-ray-$BASE}"
WORKER_CPUS="${BUBOGPT_LOCAL_WORKER_CPUS:-2}"
OBJECT_STORE_BYTES=$((${BUBOGPT_LOCAL_OBJECT_STORE_MB:-256} * 1024 * 1024))
HOST=127.0.0.1

GCS_PORT=$BASE
DASHBOARD_PORT=$((BASE + 1))
CLIENT_PORT=$((BASE + 2))
TOKEN_FILE="$TEMP_DIR/auth_token"
ENV_FILE="$TEMP_DIR/env.sh"

usage() {
  echo "usage: $0 up|down|status" >&2
  exit 2
}

# The per-node ports: node i (0 = head, 1 = worker_a, 2 = worker_b) owns BASE+10+10i .. +15 and
# the worker-process range BASE+100+100i .. +199. Each node also gets its own temp dir under
# TEMP_DIR, as separate machines would: nodes sharing one would share runtime_resources/, where
# one node's runtime-env agent re-extracts a job's working_dir while another node's processes
# (the job's driver) run inside it.
NODE_NAMES=(head worker_a worker_b)
node_args() {
  local i=$1
  local p=$((BASE + 10 + 10 * i))
  local w=$((BASE + 100 + 100 * i))
  echo "--node-ip-address=$HOST" \
    "--temp-dir=$TEMP_DIR/${NODE_NAMES[$i]}" \
    "--node-manager-port=$p" \
    "--object-manager-port=$((p + 1))" \
    "--dashboard-agent-listen-port=$((p + 2))" \
    "--dashboard-agent-grpc-port=$((p + 3))" \
    "--runtime-env-agent-port=$((p + 4))" \
    "--metrics-export-port=$((p + 5))" \
    "--min-worker-port=$w" \
    "--max-worker-port=$((w + 99))" \
    "--object-store-memory=$OBJECT_STORE_BYTES" \
    "--disable-usage-stats"
}

# Process ids of this cluster: those whose command line names TEMP_DIR (as a whole path part).
cluster_pids() {
  local proc cmd
  for proc in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$proc/cmdline") || continue
    case "$cmd" in
      *"$TEMP_DIR/"* | *"$TEMP_DIR "*) [ "${proc#/proc/}" != "$$" ] && echo "${proc#/proc/}" ;;
    esac
  done
}

up() {
  if [ -n "$(cluster_pids)" ]; then
    echo "already up under $TEMP_DIR (dashboard http://$HOST:$DASHBOARD_PORT); '$0 down' first" >&2
    exit 1
  fi
  mkdir -p "$TEMP_DIR"
  if [ ! -s "$TOKEN_FILE" ]; then
    (umask 077 && "$ROOT/.venv/bin/python" -c "import secrets; print(secrets.token_hex(32))" >"$TOKEN_FILE")
  fi
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
  # Job entrypoints run with the raylets' environment: the venv first, so `bubogpt` and `python`
  # in `ray job submit -- bubogpt ...` are the project's.
  PATH="$(dirname "$RAY"):$PATH"
  export PATH
  # A failed start must not leave half a cluster behind.
  trap 'echo "start failed; stopping what did start" >&2; down >&2' ERR

  # shellcheck disable=SC2046  # node_args is a word list on purpose
  "$RAY" start --head --port="$GCS_PORT" \
    --include-dashboard=true --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" \
    --num-cpus=0 --num-gpus=0 --resources='{"head": 1}' \
    $(node_args 0)
  local i
  for i in 1 2; do
    # shellcheck disable=SC2046
    "$RAY" start --address="$HOST:$GCS_PORT" \
      --num-cpus="$WORKER_CPUS" --num-gpus=0 --resources="{\"${NODE_NAMES[$i]}\": 1}" \
      $(node_args "$i")
  done
  trap - ERR

  cat >"$ENV_FILE" <<EOF
# Source this to talk to the local three-node Ray cluster (cluster/local.sh).
export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
EOF
  echo
  echo "Three-node Ray cluster up: head (0 CPUs) + worker_a + worker_b ($WORKER_CPUS CPU each)."
  echo "  GCS:                $HOST:$GCS_PORT"
  echo "  dashboard/Jobs API: http://$HOST:$DASHBOARD_PORT"
  echo "  client env:         source $ENV_FILE"
  echo "  submit:             $RAY job submit --working-dir . -- <command>"
  echo "  stop:               $0 down"
}

down() {
  local pids pid tries=0
  pids=$(cluster_pids)
  if [ -z "$pids" ]; then
    echo "not running (no process names $TEMP_DIR)"
    return 0
  fi
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  # Give Ray ~10 s to exit cleanly, then kill what is left. The ids are looked up again each time,
  # so an id reused by an unrelated process since is never signalled.
  while [ -n "$(cluster_pids)" ] && [ $tries -lt 20 ]; do
    sleep 0.5
    tries=$((tries + 1))
  done
  for pid in $(cluster_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$ENV_FILE"
  echo "stopped the Ray cluster under $TEMP_DIR"
}

status() {
  if [ -z "$(cluster_pids)" ]; then
    echo "down (no process names $TEMP_DIR)"
    exit 3
  fi
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" "$RAY" status --address="$HOST:$GCS_PORT"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) usage ;;
esac
