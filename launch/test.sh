#!/usr/bin/env bash
# The test suite on a fresh machine: sets up .venv, then runs pytest (slow benchmarks excluded by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
bash launch/setup_prometheus.sh  # the monitoring tests run a real Prometheus; as root it installs it from Debian
bash launch/setup_helm.sh  # tests/test_helm.py runs real helm-runs from .venv-helm (about 2 minutes to build)
exec .venv/bin/python -m pytest -q -rs "$@"  # -rs: every skip prints its reason
