"""What a run shows while it runs: the Prometheus exporter and the terminal progress bar.

May import: base, memory, runtime (stage snapshots)."""
