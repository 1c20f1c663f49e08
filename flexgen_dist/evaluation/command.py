"""`flexgen-dist eval`: lm-eval tasks (its own, or local YAMLs under --include-path) evaluated with the `flexgen-dist`
model; lm-eval's results table on stdout, its results JSON (with each engine job's summary) in --output."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from flexgen_dist.base.errors import UserError
from flexgen_dist.run_config import RunConfig

# lm-eval bootstraps some stderrs in a forked pool and ends it with SIGTERM: its workers must die of that, not unwind
# a run they do not own through the command line's handler (a traceback each).
os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    include_path: str | None = None  # a directory of task YAMLs, beside lm-eval's own tasks
    num_fewshot: int | None = None  # None: each task's own
    limit: float | None = None  # documents per task; below 1, a fraction of them
    log_samples: bool = False  # each document's requests and responses in the results JSON too
    output: str | None = None  # the results JSON


def run_eval(run: RunConfig, spec: EvalSpec) -> dict:
    """Check the request, evaluate, print the tables, write the JSON; -> lm-eval's results."""
    try:
        import lm_eval
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError as e:
        raise UserError(f"eval needs lm-evaluation-harness ({e}): pip install 'flexgen_dist[eval]'") from None
    from flexgen_dist.evaluation.lm import FlexGenLM

    if spec.include_path is not None and not Path(spec.include_path).is_dir():
        raise UserError(f"--include-path {spec.include_path}: not a directory")
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {spec.num_fewshot}")
    if spec.limit is not None and not spec.limit > 0:
        raise UserError(f"--limit must be > 0, got {spec.limit:g}")
    lm = FlexGenLM(run)
    manager = _task_manager(spec.include_path, spec.tasks)
    unknown = [t for t in spec.tasks if not manager.match_tasks([t])]
    if unknown:
        searched = f"lm-eval's and {spec.include_path}" if spec.include_path else "lm-eval's; --include-path adds yours"
        raise UserError(f"--tasks: unknown task {', '.join(unknown)} (searched {searched})")
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(_opened(spec.output)) if spec.output else None
        results = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
                                          limit=spec.limit, task_manager=manager, log_samples=spec.log_samples)
        results["flexgen_dist"] = {"jobs": lm.jobs}
        if output is not None:
            output.write(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return results


def _task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """lm-eval's task index. Indexing its own ~15k task files takes 9 s here: when every task asked for is a task (not
    a group or tag, which may name lm-eval's) under --include-path, that directory alone is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_subtasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def _opened(path: str) -> TextIO:
    """Opened before the evaluation: an unwritable path fails at once, not after it."""
    try:
        return open(path, "w")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
