#!/usr/bin/env bash
# The test suite on a fresh machine: sets up .venv, then runs pytest (slow benchmarks excluded by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
