"""lm-evaluation-harness on the engine: the `flexgen-dist` model, an lm_eval LM whose every call runs all its requests
as one offline job through the stages, and the `flexgen-dist eval` command. Needs lm-eval (the `eval` extra); only the
command line imports this room, and only when `eval` runs. helm_*.py: HELM's runs on the engine, each run's requests
one job (`python -m flexgen_dist.evaluation.helm_run`); they need crfm-helm, which lives in .venv-helm only, so no
module but them imports them or HELM.

May import: base, io, memory, engine, top (run.py and score_run.py run its jobs)."""
