"""helm-run through the engine, one command (docs/helm.md):

    .venv-helm/bin/python -m flexgen_dist.evaluation.helm_run --model DIR [engine flags] -- HELM_RUN_ARGS

registers DIR as the HELM model flexgen-dist/<DIR's name> (the models to run, unless --models-to-run names it) and runs
helm-run with HELM_RUN_ARGS and helm_runner.BatchRunner: each run's requests are one engine job. The engine flags are
`flexgen-dist eval`'s: --seed, --dummy-weights, --refill, --quiet, and every policy, resource and distribution flag.
A request the engine cannot honour stops the command with one line on stderr and exit 2."""

from __future__ import annotations

import sys

from flexgen_dist.base.errors import UserError
from flexgen_dist.cli import Parser, _add_refill_flag, _add_run_flags, _run_config, exit_code
from flexgen_dist.engine.generation import Sampling

PROG = "python -m flexgen_dist.evaluation.helm_run"
RUNNER = "flexgen_dist.evaluation.helm_runner.BatchRunner"


def build_parser() -> Parser:
    p = Parser(prog=PROG, usage=f"{PROG} --model DIR [engine flags] -- HELM_RUN_ARGS",
               description="helm-run with every run's requests executed as one flexgen-dist engine job")
    p.add_argument("--model", required=True, help="an HF checkpoint directory with its tokenizer")
    p.add_argument("--dummy-weights", action="store_true", help="seeded random weights of the checkpoint's shapes")
    p.add_argument("--seed", type=int, default=0,
                   help="dummy weights, and the generators of sampled requests with their `random` (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars of our jobs")
    _add_refill_flag(p)
    _add_run_flags(p)
    p.set_defaults(output=None)  # HELM writes the results
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:cut])  # --help too
    if cut == len(argv):
        parser.error("give helm-run's arguments after --")
    return exit_code(lambda: _helm_run(args, argv[cut + 1 :]))


def _helm_run(args, helm_argv: list[str]) -> int:
    try:
        from helm.benchmark.run import build_parser as helm_parser
        from helm.benchmark.run import helm_run
        from helm.common.hierarchical_logger import setup_default_logging

        from flexgen_dist.evaluation.helm_runner import configure
    except ImportError as e:
        raise UserError(f"needs crfm-helm ({e}): bash launch/setup_helm.sh, then run this with "
                        ".venv-helm/bin/python") from None
    run = _run_config(args, Sampling(seed=args.seed), refill=args.refill)
    helm_args = helm_parser().parse_args(helm_argv)
    if helm_args.runner_class_name:
        raise UserError(f"--runner-class-name: this command runs HELM with its own ({RUNNER})")
    name = configure(run)
    if helm_args.models_to_run is None:
        helm_args.models_to_run = [name]
    elif helm_args.models_to_run != [name]:
        raise UserError(f"--models-to-run {' '.join(helm_args.models_to_run)}: this command runs {name} only")
    helm_args.runner_class_name = RUNNER
    # The first run that fails stops the command (HELM's default logs it and goes on): a refused request would be
    # refused again in every run.
    helm_args.exit_on_error = True
    setup_default_logging(helm_args.log_config)
    helm_run(helm_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
