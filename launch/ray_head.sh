#!/usr/bin/env bash
# A single-node Ray head for `ray job submit` on this machine, its job API on loopback only:
#   bash launch/ray_head.sh start [more `ray start` flags, e.g. --num-gpus=1]
#   bash launch/ray_head.sh stop
# Token authentication stays on: a token is generated once into ~/.ray/auth_token, which the Ray CLI and drivers read
# when RAY_AUTH_MODE=token. Ray itself swaps a loopback --node-ip-address for this host's address, so its internal
# ports listen beyond loopback; the token is what guards them. The head is `ray start --block` in the background;
# `stop` ends exactly that process (and so everything it started), unlike `ray stop`, which kills every Ray process
# of this user. Ports: RAY_HEAD_PORT (GCS, default 6379), RAY_DASHBOARD_PORT (dashboard and job API, default 8265).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.ray-head
PIDFILE=$STATE/pid
URL=http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}
export RAY_AUTH_MODE=token
# Workers and job entrypoints inherit this PATH: `python` in an entrypoint is the venv's, with the package installed.
export PATH="$PWD/.venv/bin:$PATH"

head_pid() {  # the recorded PID, if that process is still our head (not a recycled PID)
  [[ -f $PIDFILE ]] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  ps -o args= -p "$pid" 2>/dev/null | grep -q "ray start --head" && echo "$pid"
}

api_status() {  # the job API's HTTP status code; 000 when nothing answers
  curl -s -o /dev/null -w '%{http_code}' "$URL/api/version" || true
}

start() {
  local pid agent_port
  if pid=$(head_pid); then
    echo "ray_head.sh: a head is already running (PID $pid); job API on $URL" >&2
    exit 1
  fi
  if [[ $(api_status) != 000 ]]; then
    echo "ray_head.sh: something already answers at $URL (another Ray head?); choose RAY_DASHBOARD_PORT" >&2
    exit 1
  fi
  bash launch/setup_env.sh
  mkdir -p "$STATE"
  ray get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token only if missing; keeps the token off screen
  # The dashboard agent's port is internal, and its fixed default (52365) is taken by any other Ray cluster on this
  # machine (the embedded one of a running `flexgen-dist generate` too), which leaves jobs with no agent to run them.
  agent_port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  # Ray starts workers at nice 15, under its own daemons: our stage actors are the compute (docs/benchmark-history.md).
  RAY_worker_niceness=0 nohup ray start --head --block --node-ip-address=127.0.0.1 --port="${RAY_HEAD_PORT:-6379}" \
    --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" --include-dashboard=true \
    --dashboard-agent-listen-port="$agent_port" --disable-usage-stats "$@" >"$STATE/head.log" 2>&1 &
  pid=$!
  echo "$pid" >"$PIDFILE"
  until [[ $(api_status) != 000 ]]; do  # any HTTP answer, 401 included (no token sent), means the job API is up
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      echo "ray_head.sh: ray start failed; the end of $STATE/head.log:" >&2
      tail -n 20 "$STATE/head.log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "Ray head running (PID $pid); job API on $URL; log: $STATE/head.log"
  echo "Submit a job from the repository root, in a shell with token auth on:"
  echo "  export RAY_AUTH_MODE=token"
  echo "  .venv/bin/ray job submit --address $URL --working-dir . -- \\"
  echo "      python launch/generate_job.py --config configs/jobs/tiny-cpu.yaml"
  echo "Stop it: bash launch/ray_head.sh stop"
}

stop() {
  local pid
  if ! pid=$(head_pid); then
    rm -f "$PIDFILE"
    echo "ray_head.sh: no head started by this script is running"
    return
  fi
  kill -TERM "$pid"  # `ray start --block` stops the processes it started, then exits
  for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "ray_head.sh: PID $pid still running after 60 s; see $STATE/head.log" >&2
    exit 1
  fi
  rm -f "$PIDFILE"
  echo "Ray head stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: bash launch/ray_head.sh start [ray start flags] | stop" >&2; exit 2 ;;
esac
