"""How much of a generate_until-like workload's decode work goes to rows whose sequence already stopped.

Held-out prompts of a checkpoint made by benchmarks/train_tiny_opt.py (its `heldout.jsonl`), cut to `--prompt-len`
tokens, each stopping at "." or a blank line or after `--max-new-tokens`; one `flexgen-dist generate` run per block
shape, in process. Prints per block shape the run summary's decode row-steps, the finished ones and their share, and
how the sequences stopped. Figures: docs/evaluation.md and docs/benchmark-history.md. `--lengths-out` keeps each
sequence's output length (of the first block shape's run) for benchmarks/ragged_lengths.py, which replays them on a
real model size.

    python benchmarks/finished_rows.py --model /tmp/tiny-llama --blocks 16x1,16x4,64x1 --lengths-out lengths.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a checkpoint dir with heldout.jsonl")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--blocks", default="16x1,16x4,64x1", help="gpu_batch_size x num_gpu_batches, comma-separated")
    ap.add_argument("--lengths-out", type=Path, help="write the output lengths, in prompt order, as a JSON list")
    args = ap.parse_args()
    heldout = [json.loads(line) for line in (args.model / "heldout.jsonl").read_text().splitlines()][: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": r["id"], "input_ids": r["input_ids"][: args.prompt_len],
                                               "stop": [".", "\n\n"], "max_new_tokens": args.max_new_tokens}) + "\n"
                                   for r in heldout))
        for block in args.blocks.split(","):
            batch, batches = block.split("x")
            out = Path(tmp) / f"out-{block}.jsonl"
            run = subprocess.run([sys.executable, "-m", "flexgen_dist", "generate", "--model", str(args.model),
                                  "--prompts", str(prompts), "--dtype", "float32", "--executor", "local", "--quiet",
                                  "--gpu-batch-size", batch, "--num-gpu-batches", batches, "--output", str(out)],
                                 capture_output=True, text=True, check=True)
            summary = json.loads(run.stdout.strip().splitlines()[-1])
            records = [json.loads(line) for line in out.read_text().splitlines()]
            if args.lengths_out and block == args.blocks.split(",")[0]:
                by_id = {r["id"]: len(r["output_ids"]) for r in records}
                args.lengths_out.write_text(json.dumps([by_id[str(r["id"])] for r in heldout]) + "\n")
            lengths = sorted(len(r["output_ids"]) for r in records)
            print(json.dumps({"block": block, **{k: summary[k] for k in ("decode_row_steps", "finished_row_steps",
                                                                          "finished_row_share")},
                              "finish_reasons": Counter(r["finish_reason"] for r in records),
                              "output_len_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]]}),
                  flush=True)


if __name__ == "__main__":
    main()
