"""Object-store hop cost between two Ray actors, for hidden states of decode and prefill shapes.

    .venv/bin/python benchmarks/bench_hop.py

Three ways: a torch tensor the receiver only takes; the same, the receiver reads every element; a numpy view (which
Ray maps zero-copy from shared memory), the receiver reads every element. Prints one JSON line, medians of 5.
"""

from __future__ import annotations

import json
import statistics
import time

import ray
import torch

SHAPES = {"decode [32,1,2048]": (32, 1, 2048), "prefill [32,128,2048]": (32, 128, 2048),
          "prefill [32,512,7168]": (32, 512, 7168)}


@ray.remote(num_cpus=0.5)
class Stage:
    def make(self, shape: tuple[int, ...], as_numpy: bool):
        t = torch.randn(*shape).to(torch.bfloat16)
        return t.view(torch.int16).numpy() if as_numpy else t

    def take(self, t, read: bool) -> float:
        if not read:
            return 0.0
        if not isinstance(t, torch.Tensor):
            t = torch.from_numpy(t).view(torch.bfloat16)
        return float(t.float().sum())


def hop_ms(a, b, shape, as_numpy: bool, read: bool) -> float:
    times = []
    for _ in range(6):
        ref = a.make.remote(shape, as_numpy)
        ray.wait([ref])
        start = time.perf_counter()
        ray.get(b.take.remote(ref, read))
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[1:]) * 1000, 2)


def main() -> None:
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    a, b = Stage.remote(), Stage.remote()
    out = {}
    for name, shape in SHAPES.items():
        out[name] = {"MB": round(2 * torch.Size(shape).numel() / 1e6, 2),
                     "torch_ms": hop_ms(a, b, shape, False, False),
                     "torch_read_ms": hop_ms(a, b, shape, False, True),
                     "numpy_read_ms": hop_ms(a, b, shape, True, True)}
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
