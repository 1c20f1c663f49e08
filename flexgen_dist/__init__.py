"""flexgen_dist: high-throughput offloaded OPT inference (FlexGen design) with a Ray pipeline."""
__version__ = "0.1.0"
