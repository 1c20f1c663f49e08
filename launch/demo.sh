#!/usr/bin/env bash
# The main job on a fresh machine, no network: a dummy-weight OPT-125m with its weights on disk and in CPU memory,
# the KV cache in CPU memory, 32 prompts in blocks of 2 x 8. Results in outputs/demo.jsonl; summary on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
mkdir -p outputs
rm -f outputs/demo.jsonl  # generate resumes from an existing output; the demo starts fresh
exec .venv/bin/flexgen-dist generate --model opt-125m --dummy-weights \
  --synthetic 32 --prompt-len 64 --max-new-tokens 16 --ignore-eos \
  --policy configs/policies/demo-offload.yaml \
  --offload-dir "${TMPDIR:-/tmp}/flexgen-offload" --output outputs/demo.jsonl "$@"
