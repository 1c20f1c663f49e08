"""Model math and shapes, one module per family (opt.py, llama.py; family.py names the interface and holds the
registry): size tables, config readers and writers, which weights each engine layer holds, the pure layer functions.
Shared by all families: attention (with grouped-query heads), weight prepacking for CPU GEMMs, log-likelihoods.

May import: base."""
