"""What comes in and goes out of a run: prompt files, durable resumable outputs, `--model` resolution, checkpoint
reading (and dummy weights) and writing.

May import: base, models."""
