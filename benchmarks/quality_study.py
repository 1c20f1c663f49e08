"""How much the approximations cost in quality, measured through `flexgen-dist` on a tiny OPT trained here.

Trains with benchmarks/train_tiny_opt.py (unless --model names an existing checkpoint from it), then prints markdown
tables: held-out perplexity (`flexgen-dist score`) uncompressed, with 4/8-bit weights and KV cache and with sparse
attention, scored in one prefill and with each chunk's last tokens teacher-forced through decode steps (only those
read the KV cache and use sparse attention); and the position-wise agreement of greedy `generate` output with dense,
uncompressed generation.

    python benchmarks/quality_study.py --minutes 5 [--out DIR]

tests/test_quality.py uses these helpers with a shorter training run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from flexgen_dist.cli import main as cli_main

FLOAT32 = ("--dtype", "float32", "--device", "cpu", "--executor", "local", "--quiet")
SCORED = {  # name -> flags, judged by held-out perplexity
    "uncompressed": (),
    "4-bit weights": ("--compress-weight",),
    "4-bit KV cache": ("--compress-cache",),
    "4-bit weights + KV cache": ("--compress-weight", "--compress-cache"),
    "8-bit weights + KV cache": ("--compress-weight", "--compress-cache", "--compress-bits", "8"),
    "attn-sparsity 0.5": ("--attn-sparsity", "0.5"),
    "attn-sparsity 0.25": ("--attn-sparsity", "0.25"),
}
APPROXIMATIONS = {  # name -> flags, judged by greedy agreement with dense, uncompressed generation
    "attn-sparsity 0.5": ("--attn-sparsity", "0.5"),
    "attn-sparsity 0.25": ("--attn-sparsity", "0.25"),
    "4-bit KV cache": ("--compress-cache",),
    "4-bit weights + KV cache": ("--compress-weight", "--compress-cache"),
}


def train(out: Path, minutes: float, steps: int = 0, family: str = "opt") -> None:
    """benchmarks/train_tiny_opt.py in a subprocess (it sets its own thread count); `steps` 0: wall time only."""
    script = Path(__file__).with_name("train_tiny_opt.py")
    subprocess.run([sys.executable, str(script), "--out", str(out), "--minutes", str(minutes), "--steps", str(steps),
                    "--family", family], check=True)


def run_cli(*argv: str) -> tuple[dict, list[dict]]:
    """One in-process `flexgen-dist` command writing to a temporary --output: (summary, records)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = cli_main([*argv, "--output", str(out)])
        if rc != 0:
            raise RuntimeError(f"flexgen-dist {' '.join(argv)} exited {rc}")
        return json.loads(stdout.getvalue().strip().splitlines()[-1]), [json.loads(l) for l in out.open()]


def perplexity(model: Path, prompts: Path, *flags: str, decode_tokens: int = 0) -> float:
    summary, _ = run_cli("score", "--model", str(model), "--prompts", str(prompts), "--gpu-batch-size", "16",
                         "--decode-tokens", str(decode_tokens), *FLOAT32, *flags)
    return summary["perplexity"]


def generation_prompts(heldout: Path, out: Path, count: int, prompt_len: int) -> Path:
    """The first `prompt_len` tokens of `count` held-out chunks (prompt + new tokens stay within the trained positions)."""
    lines = [json.loads(l) for l in heldout.open()][:count]
    out.write_text("".join(json.dumps({"id": r["id"], "input_ids": r["input_ids"][:prompt_len]}) + "\n" for r in lines))
    return out


def greedy(model: Path, prompts: Path, new_tokens: int, *flags: str) -> dict[str, list[int]]:
    _, records = run_cli("generate", "--model", str(model), "--prompts", str(prompts), "--max-new-tokens",
                         str(new_tokens), "--ignore-eos", "--gpu-batch-size", "16", *FLOAT32, *flags)
    return {r["id"]: r["output_ids"] for r in records}


def agreement(reference: dict[str, list[int]], other: dict[str, list[int]]) -> float:
    """Fraction of generated positions where both runs chose the same token."""
    pairs = [(a, b) for rid, ref in reference.items() for a, b in zip(ref, other[rid], strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training wall time")
    p.add_argument("--steps", type=int, default=0, help="training steps, at most (default: no bound)")
    p.add_argument("--out", type=Path, help="where the checkpoint goes (default: a temporary directory)")
    p.add_argument("--model", type=Path, help="a checkpoint this script trained before: skip training")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts for the greedy comparisons")
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens, and tokens scored by decode steps")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or args.out or Path(tmp) / "tiny-opt"
        if args.model is None:
            train(model, args.minutes, args.steps)
        heldout = model / "heldout.jsonl"
        chunks = sum(1 for _ in heldout.open())
        prefill = {name: perplexity(model, heldout, *flags) for name, flags in SCORED.items()}
        decoded = {name: perplexity(model, heldout, *flags, decode_tokens=args.new_tokens)
                   for name, flags in SCORED.items()}
        prompts = generation_prompts(heldout, Path(tmp) / "gen.jsonl", args.prompts, args.prompt_len)
        dense = greedy(model, prompts, args.new_tokens)
        agree = {name: agreement(dense, greedy(model, prompts, args.new_tokens, *flags))
                 for name, flags in APPROXIMATIONS.items()}
        training = json.loads((model / "training.json").read_text())
    print(f"model: {training['config']}, {training['steps']} steps in {training['train_s']:.0f} s\n")
    print(f"held-out perplexity ({chunks} chunks, float32), scored in one prefill | with the last {args.new_tokens} "
          f"tokens of each chunk in decode steps:\n\n| configuration | prefill | ratio | decode | ratio |\n"
          "|---|---|---|---|---|")
    for name in SCORED:
        print(f"| {name} | {prefill[name]:.3f} | {prefill[name] / prefill['uncompressed']:.4f} | {decoded[name]:.3f} "
              f"| {decoded[name] / decoded['uncompressed']:.4f} |")
    print(f"\ngreedy agreement with dense generation ({args.prompts} prompts x {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, position-wise):\n\n| approximation | agreement |\n|---|---|")
    for name, value in agree.items():
        print(f"| {name} | {value:.4f} |")

if __name__ == "__main__":
    main()
