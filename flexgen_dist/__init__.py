"""flexgen_dist: high-throughput offloaded OPT inference (FlexGen design) with a Ray pipeline.

The top level holds the command line (cli.py), job YAML files (job_config.py), what one run is asked to do
(run_config.py) and the run orchestration (run.py: generate, score_run.py: score); the rooms below hold the rest and
import only the rooms their docstrings name:

    base/  models/  io/  memory/  engine/  runtime/  policy/  observability/  bench/
"""
__version__ = "0.1.0"
