"""`flexgen-dist bench`: our engine and the baselines (HF generate, HF accelerate) on the same work, each in its own
process, with rooflines and a Pareto plot. Imported only when `bench` runs.

May import: base, models, io, memory, engine, runtime, policy, observability."""
