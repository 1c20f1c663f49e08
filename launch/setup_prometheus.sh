#!/usr/bin/env bash
# Install Prometheus and promtool from Debian for the monitoring tests (tests/test_metrics.py), when missing.
# Idempotent: nothing to do once promtool exists. Without root or apt-get it says so and exits 0; those tests then
# skip with the reason. The package's own service is never started: every Prometheus here is one a test starts on
# 127.0.0.1 and stops.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup_prometheus: promtool missing and no root apt-get here; the Prometheus tests will be skipped" >&2
  exit 0
fi
# Debian starts a package's service on install unless policy-rc.d (exit 101) forbids it; add one only if none exists.
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  guard=/usr/sbin/policy-rc.d
fi
trap '[ -z "$guard" ] || rm -f "$guard"' EXIT
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } \
    >/tmp/setup_prometheus.log 2>&1; then
  echo "setup_prometheus: apt-get install prometheus failed (log: /tmp/setup_prometheus.log); the Prometheus tests" \
       "will be skipped" >&2
fi
