"""Time a generate_until-like workload at a real model size: output lengths that vary as an evaluation's do.

Each prompt's output length is taken from a measured run (`benchmarks/finished_rows.py --lengths-out`: the tiny
trained model stopping at "." or a blank line) and replayed with random weights of a size name, random prompt ids,
`--ignore-eos` and that length as the prompt's own `max_new_tokens`. So a block steps as long as its longest
sequence, as in the measured run, while the work per step is a real model's. One `flexgen-dist generate` run per
block shape, in its own process; prints per run the summary's times, throughput and finished-row share.
`--prompts N` replays the lengths in turn for N prompts: refill (`-- --refill`) needs more prompts than a block.

    python benchmarks/ragged_lengths.py --model opt-1.3b --lengths lengths.json --blocks 32x2 -- --dtype float32
    python benchmarks/ragged_lengths.py --model opt-1.3b --lengths lengths.json --prompts 192 --blocks 64x1 \
        -- --dtype float32 --refill
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a size name (random weights) or a checkpoint directory")
    ap.add_argument("--lengths", type=Path, required=True, help="a JSON list of output lengths, one per prompt")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--prompts", type=int, help="prompts to run, the lengths taken in turn (default: one per length)")
    ap.add_argument("--blocks", default="32x2", help="gpu_batch_size x num_gpu_batches, comma-separated")
    ap.add_argument("generate_flags", nargs="*", help="more `generate` flags, after --")
    args = ap.parse_args()
    measured = json.loads(args.lengths.read_text())
    lengths = [measured[i % len(measured)] for i in range(args.prompts or len(measured))]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": i, "max_new_tokens": n,
                                               "input_ids": [rng.randrange(100, 30000) for _ in range(args.prompt_len)]})
                                   + "\n" for i, n in enumerate(lengths)))
        dummy = [] if Path(args.model).is_dir() else ["--dummy-weights"]
        for block in args.blocks.split(","):
            batch, batches = block.split("x")
            run = subprocess.run([sys.executable, "-m", "flexgen_dist", "generate", "--model", args.model, *dummy,
                                  "--prompts", str(prompts), "--ignore-eos", "--quiet", "--executor", "local",
                                  "--gpu-batch-size", batch, "--num-gpu-batches", batches,
                                  "--output", str(Path(tmp) / f"out-{block}.jsonl"), *args.generate_flags],
                                 capture_output=True, text=True, check=True)
            summary = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps({"block": block, **{k: summary[k] for k in (
                "generated_tokens", "total_s", "prefill_s", "decode_s", "generation_throughput_tok_s",
                "decode_row_steps", "finished_row_share")}, "refilled_sequences": summary.get("refilled_sequences")}),
                  flush=True)


if __name__ == "__main__":
    main()
