#!/usr/bin/env bash
# Install HELM (crfm-helm) in .venv-helm, its own environment beside .venv, with this package (editable) in it, for
# `.venv-helm/bin/python -m flexgen_dist.evaluation.helm_run` (docs/helm.md). Idempotent: nothing to do once both
# import.
#
# Its own environment because crfm-helm 0.5.16 pins datasets 3.6, and .venv has datasets 5.2 (lm-eval's). An unpinned
# install replaces the CPU torch with a CUDA build; crfm-helm needs torchvision, and PyPI's 0.28 (torch 2.13's) is a
# CUDA build that breaks `import transformers` beside the CPU torch, and no text scenario uses it, so it goes.
# One resolve for crfm-helm and this package: a dependency they disagree on fails the install instead of being
# replaced. Measured here (2 cores): about 2 minutes from nothing (3.5 where more was downloaded), 2.3 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-helm
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import helm.benchmark.run, flexgen_dist.evaluation.helm_run" \
    >/dev/null 2>&1; then
  exit 0
fi
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q crfm-helm==0.5.16 -e . torch==2.13.0 'torchvision==0.28.*'
"$VENV/bin/pip" uninstall -q -y torchvision
"$VENV/bin/python" -c "import helm.benchmark.run, flexgen_dist.evaluation.helm_run; print('crfm-helm 0.5.16 in $VENV')"
