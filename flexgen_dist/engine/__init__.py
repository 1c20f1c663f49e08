"""One stage's computation on one device: the policy it runs (`Policy`), the zig-zag engine over a slice of layers,
its background transfer lanes, and what a block does with logits (sampling, stopping, scoring). No Ray, no search.

May import: base, models, io, memory."""
