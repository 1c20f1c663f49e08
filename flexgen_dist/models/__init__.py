"""Model math and shapes: the OPT size table and config reader, the pure layer functions, which weights each engine
layer holds, weight prepacking for CPU GEMMs, log-likelihoods from logits.

May import: base."""
