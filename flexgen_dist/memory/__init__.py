"""Where tensors live and how they move between tiers: tiers and byte accounting, O_DIRECT disk tensors, group-wise
compression, the weight and KV-cache homes, placement splits, budget parsing, transfer statistics.

May import: base, models, io."""
