"""Entrypoint of a generation or evaluation job on a Ray cluster:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/generate_job.py --config configs/jobs/tiny-cpu.yaml [--set KEY=VALUE ...]

Runs the job a YAML config describes (keys: flexgen_dist/job_config.py) on the cluster that `ray job submit` points
RAY_ADDRESS at. Like `flexgen-dist generate`: the last stdout line is the JSON summary, bad input exits 2 with one line.
An evaluation job (`eval:` instead of `input:`) runs as `flexgen-dist eval`: lm-eval's tables, then as the last line
each task's results and each engine job's summary; `output` gets lm-eval's whole results JSON.
"""

from __future__ import annotations

import json
import sys

from flexgen_dist.cli import Parser, exit_code
from flexgen_dist.job_config import load_job_config
from flexgen_dist.openai_output import batch_input
from flexgen_dist.run import generate


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="generate_job.py", description="Run a generation job described by a YAML config.")
    parser.add_argument("--config", required=True, metavar="JOB.yaml", help="e.g. configs/jobs/tiny-cpu.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a config key, value as YAML; dotted keys reach into mappings (sampling.seed=3)")
    args = parser.parse_args(argv)

    def run() -> int:
        job = load_job_config(args.config, args.overrides)
        if job.evaluation is not None:
            from flexgen_dist.evaluation.command import EvalSpec, run_eval

            e = job.evaluation
            results = run_eval(job.run, EvalSpec(e.tasks, e.include_path, e.num_fewshot, e.limit, e.log_samples,
                                                 job.run.output))
            print(json.dumps({"results": results["results"], "jobs": results["flexgen_dist"]["jobs"]}), flush=True)
            return 0
        batch = batch_input(job.prompts_file, job.prompts_format, job.run) if job.prompts_file else None
        print(json.dumps(generate(job.run, *batch) if batch else generate(job.run, job.requests())), flush=True)
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
