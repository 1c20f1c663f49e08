"""Foundations every room uses: the one-line user error, typed YAML fields, device and dtype resolution.

May import: nothing of flexgen_dist."""
