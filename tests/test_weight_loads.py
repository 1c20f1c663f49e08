"""The weight lane keeps two layer loads in flight when loading is slower than compute, and the second load never
overwrites a staging slot a layer still computes from: the logits equal a serialized run's."""

from __future__ import annotations

import threading
import time

import torch
from engine_steps import greedy_logits

from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.stage_engine import StageEngine
from flexgen_dist.io.weights import open_checkpoint
from flexgen_dist.memory.weight_home import WeightHome
from flexgen_dist.models.family import model_layers


def test_two_weight_loads_run_at_once_and_the_logits_equal_a_serialized_run(tmp_path, opt_postln_dir, monkeypatch):
    cfg, source = open_checkpoint(opt_postln_dir)
    ids = torch.randint(4, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    valids = [torch.ones(2, 7 + t, dtype=torch.bool) for t in range(3)]
    on_disk = dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)

    def engine(overlap: bool) -> StageEngine:
        return StageEngine(cfg, model_layers(cfg), Policy(overlap=overlap, **on_disk), source, torch.device("cpu"),
                           torch.float32, str(tmp_path))

    serial = engine(False)
    try:
        expected = greedy_logits([serial], ids, valids)
    finally:
        serial.close()

    fetch, lock, running, most = WeightHome.fetch, threading.Lock(), [0], [0]

    def slow_fetch(self, *args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)  # loading slower than compute: the next layer's load is still running
            return fetch(self, *args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(WeightHome, "fetch", slow_fetch)
    overlapped = engine(True)
    try:
        got = greedy_logits([overlapped], ids, valids)
    finally:
        overlapped.close()
    assert most[0] == 2
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
