"""The pipeline model against measured runs: predicted throughput and per-stage idle of S = 1, 2, … stages for one
fixed policy, next to the figures of `flexgen-dist bench --stages …` (its JSON output, or --measured S=TOK/S).

    .venv/bin/python benchmarks/pipeline_model_check.py --hardware configs/hardware/dev-xeon-2core-amx-bf16-1thread.yaml \
        --model opt-1.3b --prompt-len 64 --gen-len 32 --num-prompts 64 --gpu-batch-size 16 --stages 1 2 \
        --bench-json bench.json

The profile must be measured as a stage computes: one stage per core wants a one-thread profile
(`OMP_NUM_THREADS=1 flexgen-dist profile`). Prints one line per stage count and, last, a JSON line.
"""

from __future__ import annotations

import argparse
import json

from flexgen_dist.base.devices import DTYPES
from flexgen_dist.engine.policy import Policy
from flexgen_dist.models.family import config_by_name
from flexgen_dist.policy.hardware import load_profile
from flexgen_dist.policy.pipeline_model import predict_pipeline
from flexgen_dist.runtime.coordinator import prefill_chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", required=True)
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--gpu-batch-size", type=int, default=16)
    ap.add_argument("--num-gpu-batches", type=int, default=1)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--blocks-in-flight", type=int, nargs="+",
                    help="per stage count (default: what the measured run kept, else one block per stage)")
    ap.add_argument("--bench-json", help="the last stdout line of `flexgen-dist bench --stages …`, saved to a file")
    args = ap.parse_args()
    measured = {}
    if args.bench_json:
        with open(args.bench_json) as f:
            result = json.loads(f.read().strip().splitlines()[-1])
        measured = {p["stages"]: p for p in result["points"] if p["system"] == "flexgen_dist"}
    cfg, hardware = config_by_name(args.model), load_profile(args.hardware)
    policy = Policy(gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches)  # every tier resident
    rows = []
    for i, stages in enumerate(args.stages):
        if args.blocks_in_flight:
            in_flight = args.blocks_in_flight[i]
        else:
            in_flight = measured[stages].get("blocks_in_flight", stages) if stages in measured else stages
        pred = predict_pipeline(cfg, [policy] * stages, [hardware] * stages, DTYPES[args.dtype], args.prompt_len,
                                args.gen_len, args.num_prompts, prefill_chunks(None, [policy] * stages), in_flight)
        row = {"stages": stages, "blocks_in_flight": in_flight, "predicted_tok_s": round(pred.throughput_tok_s, 2),
               "predicted_idle_s": [round(x, 2) for x in pred.stage_idle_s], "predicted_bubble": round(pred.bubble, 3)}
        if stages in measured:
            m = measured[stages]
            row.update(measured_tok_s=round(m["generation_throughput_tok_s"], 2),
                       measured_idle_s=[s["idle_s"] for s in m["stage_stats"]],
                       predicted_over_measured=round(pred.throughput_tok_s / m["generation_throughput_tok_s"], 3))
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
