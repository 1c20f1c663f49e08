"""Choosing a policy: hardware profiles and the profiler that measures them, the cost model (one stage) and the
pipeline model (S stages, their schedule replayed), the pre-load memory plan, the LP search, `--policy auto` at run
time, and a run's roofline. (The `Policy` type itself is the engine's: flexgen_dist.engine.policy.) The profiler runs
the engine, so it is imported only where a measurement is asked for.

May import: base, models, io, memory, engine, runtime (its stage cuts and prefill parts)."""
