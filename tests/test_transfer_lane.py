"""Background lanes: work runs in order (one worker) or side by side (several), failures surface at drain, and
finished results are not kept alive; transfer counters count overlapping transfers' time once."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from flexgen_dist.engine.transfer import Lane
from flexgen_dist.memory.stats import TransferStats


@pytest.mark.parametrize("overlap", [True, False])
def test_runs_in_order_and_drain_reraises_the_first_failure(overlap):
    lane, seen = Lane(torch.device("cpu"), overlap, "test"), []
    try:
        for i in range(5):
            lane.submit(seen.append, i)

        def fail():
            raise OSError("disk gone")

        lane.submit(fail)
        lane.submit(seen.append, 5)
        with pytest.raises(OSError, match="disk gone"):
            lane.drain()
        assert seen == list(range(6))
        lane.drain()  # reported once
    finally:
        lane.close()


def test_a_consumed_result_is_freed_before_the_step_drains():
    """The engine takes a staged KV copy from a load's future, uses it, and lets go; the lane must not hold it until
    drain() (that kept every layer's staged cache of a step alive at once)."""
    lane = Lane(torch.device("cpu"), True, "test")
    release = threading.Event()
    try:
        future = lane.submit(lambda: torch.empty(1 << 20))
        staged = weakref.ref(future.result())
        del future
        lane.submit(release.wait)  # the next submit prunes finished work
        gc.collect()
        assert staged() is None
    finally:
        release.set()
        lane.drain()
        lane.close()


def test_a_cpu_lane_thread_computes_single_threaded_and_leaves_compute_its_threads():
    """A second OpenMP team on the compute cores makes libgomp stop spinning for every team (transfer.Lane)."""
    before = torch.get_num_threads()
    lane = Lane(torch.device("cpu"), True, "test")
    try:
        assert lane.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == before
    finally:
        lane.close()


def test_a_two_worker_lane_runs_two_pieces_of_work_at_once():
    """Each piece waits for the other at a barrier: one worker would time out."""
    lane = Lane(torch.device("cpu"), True, "test", workers=2)
    meet = threading.Barrier(2, timeout=10)
    try:
        futures = [lane.submit(meet.wait) for _ in range(2)]
        assert sorted(f.result() for f in futures) == [0, 1]
    finally:
        lane.close()


def test_overlapping_transfers_of_a_flow_count_their_common_time_once():
    stats = TransferStats()
    with stats.timed("weights", "disk", "gpu", 100):
        with stats.timed("weights", "disk", "gpu", 50):
            time.sleep(0.2)
    flow = stats.summary()["transfers"]["weights:disk->gpu"]
    assert flow["bytes"] == 150
    assert 0.2 <= flow["seconds"] < 0.35  # the sum of the two would be >= 0.4


def test_a_failed_transfer_moves_no_bytes_but_its_time_counts():
    stats = TransferStats()
    with pytest.raises(OSError):
        with stats.timed("cache", "disk", "gpu", 100):
            raise OSError("disk gone")
    flow = stats.summary()["transfers"]["cache:disk->gpu"]
    assert flow["bytes"] == 0 and flow["seconds"] >= 0
