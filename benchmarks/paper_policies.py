"""The policies `--policy auto` picks on the FlexGen paper's T4 machine, next to the paper's own (issue 4).

    python benchmarks/paper_policies.py [--hardware configs/hardware/t4-paper.yaml]

Prints a markdown table: for opt-6.7b / 30b / 175b at prompt 512 + 32 new tokens, the policy our search chooses and
its predicted throughput, and the paper's hand-tuned policy (FlexGen's benchmark/flexgen/bench_suite.py, without and
with compression) with the throughput our cost model predicts for it. Then, where bench_suite records a measured
throughput (prompt 256), that figure next to our prediction of the same policy: a check of the cost model against
the paper's real T4 runs.
"""

from __future__ import annotations

import argparse

import torch

from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.policy.cost_model import predict
from flexgen_dist.policy.hardware import load_profile
from flexgen_dist.policy.search import search_policy


def _paper(percent: tuple[float, ...], batch: int, blocks: int, **flags) -> Policy:
    w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = percent
    return Policy(gpu_batch_size=batch, num_gpu_batches=blocks, w_gpu_percent=w_gpu, w_cpu_percent=w_cpu,
                  cache_gpu_percent=c_gpu, cache_cpu_percent=c_cpu, act_gpu_percent=a_gpu, act_cpu_percent=a_cpu,
                  **flags)


COMPRESSED = dict(compress_weight=True, compress_cache=True)
# bench_suite.py's single-T4 cases at prompt 512, gen 32 (suite_*_1x1 and suite_*_1x1_comp).
PAPER_512 = {
    "opt-6.7b": [("paper", _paper((100, 0, 100, 0, 100, 0), 2, 1, overlap=False)),
                 ("paper, compressed", _paper((100, 0, 100, 0, 100, 0), 72, 1, overlap=False, **COMPRESSED))],
    "opt-30b": [("paper", _paper((20, 80, 0, 100, 0, 100), 48, 3, cpu_cache_compute=True)),
                ("paper, compressed", _paper((0, 100, 0, 100, 0, 100), 64, 8, compress_cache=True))],
    "opt-175b": [("paper", _paper((0, 50, 0, 0, 0, 100), 32, 8, cpu_cache_compute=True)),
                 ("paper, compressed", _paper((0, 100, 0, 100, 0, 100), 48, 3, **COMPRESSED))],
}
# bench_suite.py's prompt-256 cases that carry a measured throughput in their comments (tokens/s on the T4).
PAPER_256_MEASURED = [
    ("opt-6.7b", _paper((100, 0, 100, 0, 100, 0), 128, 1, overlap=False, **COMPRESSED), 56.72),
    ("opt-30b", _paper((10, 90, 0, 100, 0, 100), 160, 2, cpu_cache_compute=True), 16.01),
    ("opt-30b", _paper((0, 100, 0, 100, 0, 100), 128, 8, compress_cache=True), 16.86),
    ("opt-175b", _paper((0, 50, 0, 0, 0, 100), 64, 8, cpu_cache_compute=True), 1.36),
    ("opt-175b", _paper((0, 100, 0, 100, 0, 100), 96, 3, **COMPRESSED), 2.26),
]


def _describe(p: Policy) -> str:
    flags = [name for name, on in (("compressed weights", p.compress_weight), ("compressed cache", p.compress_cache),
                                   ("CPU attention", p.cpu_cache_compute), ("no overlap", not p.overlap)) if on]
    def tiers(*percents: float) -> str:
        return "/".join(f"{round(x, 1):g}" for x in percents)

    return (f"{p.gpu_batch_size} x {p.num_gpu_batches} | {tiers(*p.weight_percents())} | {tiers(*p.cache_percents())} | "
            f"{tiers(*p.act_percents())} | {', '.join(flags) or '-'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", default="configs/hardware/t4-paper.yaml")
    args = p.parse_args()
    hw = load_profile(args.hardware)
    dtype = torch.float16
    print("| model | policy | batch x batches | weights gpu/cpu/disk % | cache gpu/cpu/disk % | activations % | "
          "options | predicted tok/s | peak GPU GB | peak CPU GB | search s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, paper in PAPER_512.items():
        cfg = config_by_name(model)
        layers = model_layers(cfg)
        result = search_policy(cfg, layers, hw, dtype, 512, 32, MemoryBudget())
        rows = [("auto (ours)", result.policy, result.prediction, f"{result.seconds:.2f}")]
        rows += [(name, policy, predict(cfg, layers, policy, hw, dtype, 512, 32), "") for name, policy in paper]
        for name, policy, prediction, seconds in rows:
            peak = prediction.peak_bytes
            print(f"| {model} | {name} | {_describe(policy)} | {prediction.throughput_tok_s:.2f} | "
                  f"{peak['gpu'] / 1e9:.1f} | {peak['cpu'] / 1e9:.1f} | {seconds} |")
    print("\n| model | paper policy at prompt 256, gen 32: batch x batches | weights % | cache % | activations % | "
          "options | measured on the T4 (bench_suite) | our prediction | prediction / measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, policy, measured in PAPER_256_MEASURED:
        cfg = config_by_name(model)
        predicted = predict(cfg, model_layers(cfg), policy, hw, dtype, 256, 32).throughput_tok_s
        print(f"| {model} | {_describe(policy)} | {measured:.2f} | {predicted:.2f} | "
              f"{predicted / measured:.2f} |")


if __name__ == "__main__":
    main()
