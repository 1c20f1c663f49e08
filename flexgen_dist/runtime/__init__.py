"""The pipeline runtime: stage workers (one engine on one device), executors (in-process, or Ray actors: all Ray code
is in ray_executor.py), the coordinator that keeps blocks in flight through the stages, cost-balanced stage cuts, and
each stage's snapshot for the metrics.

May import: base, models, io, memory, engine."""
