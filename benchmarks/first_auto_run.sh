#!/usr/bin/env bash
# A user's first `--policy auto` run on a fresh machine: no cached profile, a Ray head with its dashboard (~1 GB) and
# the run together under one hard memory limit, one CPU per stage. The stages measure their own node within the run's
# budgets; the driver measures nothing. Prints the profile time (from the stages' stderr), the run's summary figures
# and memlimit's peak.
#
#   bash benchmarks/first_auto_run.sh 3G 2 -- --model opt-1.3b --dummy-weights --synthetic 128 --prompt-len 64 \
#       --max-new-tokens 16 --ignore-eos --max-memory gpu=800MiB,cpu=200MiB
#
# Arguments: the memory limit, the stage count, then `--` and generate's workload flags.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] && [ "$3" = "--" ] || { echo "usage: first_auto_run.sh LIMIT STAGES -- GENERATE-FLAGS..." >&2; exit 2; }
limit=$1 stages=$2
shift 3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export XDG_CACHE_HOME=$work/cache  # no profile cached: this is the first run
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export RAY_USAGE_STATS_ENABLED=0
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
inner=$(cat <<EOF
.venv/bin/ray start --head --block --node-ip-address=127.0.0.1 --port=$port --dashboard-host=127.0.0.1 \
  --include-dashboard=true --num-cpus=$stages --disable-usage-stats > "$work/head.log" 2>&1 &
head=\$!
until .venv/bin/ray status --address=127.0.0.1:$port > /dev/null 2>&1; do sleep 1; done
set +e
/usr/bin/time -f "wall %e s" .venv/bin/flexgen-dist generate --policy auto --stages $stages --cpus-per-stage 1 \
  --ray-address 127.0.0.1:$port --offload-dir "$work/offload" --output "$work/out.jsonl" $* \
  > "$work/stdout" 2> "$work/stderr"
rc=\$?
kill \$head; wait \$head
exit \$rc
EOF
)
set +e
../shared/tools/memlimit "$limit" -- bash -c "$inner"
rc=$?
set -e
grep -h "measur\|^wall\|error" "$work/stderr" | sed 's/^\x1b\[[0-9;]*m//' || true
if [ $rc -eq 0 ]; then
  python3 - "$work/stdout" <<'PY'
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(json.dumps({k: s[k] for k in ("generation_throughput_tok_s", "total_s", "load_s", "peak_bytes")}))
search = s["policy_search"]
for i, policy in enumerate(s.get("stage_policies", [s["policy"]])):
    hardware = search["stages"][i]["hardware"] if "stages" in search else search["hardware"]
    print(f"stage {i} ({hardware}): {policy}")
if "pipeline" in search:
    print("pipeline model:", json.dumps(search["pipeline"]))
PY
  ls "$XDG_CACHE_HOME/flexgen_dist"
fi
exit $rc
