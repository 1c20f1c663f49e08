"""Page-locked CPU buffers are kept for the next block's homes, within the peak already held (page_locked.py).

CUDA's page-locking is replaced by a recorder: the bookkeeping is what these tests check, on any machine."""

import torch

from flexgen_dist.memory.disk import aligned_empty
from flexgen_dist.memory.page_locked import PageLockedBuffers
from flexgen_dist.memory.tiers import Tier, TierSet


class Recorder:
    def __init__(self) -> None:
        self.locked: dict[int, int] = {}  # data_ptr -> bytes locked
        self.unlocks = 0

    def lock(self, t: torch.Tensor) -> None:
        assert t.data_ptr() not in self.locked
        self.locked[t.data_ptr()] = t.nbytes

    def unlock(self, t: torch.Tensor) -> None:
        del self.locked[t.data_ptr()]
        self.unlocks += 1


def _buffers() -> tuple[PageLockedBuffers, Recorder]:
    rec = Recorder()
    return PageLockedBuffers(aligned_empty, rec.lock, rec.unlock), rec


def test_blocks_of_the_same_shapes_lock_once():
    pool, rec = _buffers()
    shapes = [(4, 2, 8, 16)] * 3 + [(4, 2, 8, 8)]
    first = [pool.take(s, torch.float16) for s in shapes]
    for t in first:
        pool.release(t)
    second = [pool.take(s, torch.float16) for s in shapes]
    assert pool.locks == 4 and pool.reuses == 4 and rec.unlocks == 0
    assert {t.data_ptr() for t in second} == {t.data_ptr() for t in first}
    assert [tuple(t.shape) for t in second] == shapes


def test_spares_never_hold_more_than_the_peak():
    pool, rec = _buffers()
    big = [pool.take((1024,), torch.float32) for _ in range(4)]  # the peak: 16 KiB
    for t in big:
        pool.release(t)
    small = [pool.take((512,), torch.float32) for _ in range(4)]  # a smaller last block: 8 KiB in use
    # each new 2 KiB buffer unlocked one 4 KiB spare while spare + in use exceeded 16 KiB: two spares stay
    assert pool.locks == 8 and pool.reuses == 0 and rec.unlocks == 2
    assert len(rec.locked) == 6 and all(t.data_ptr() in rec.locked for t in small)
    assert sum(rec.locked.values()) <= 4 * 4096  # in use and spare together
    pool.close()
    assert not rec.locked and rec.unlocks == 8


def test_dtype_must_match_and_unknown_tensors_are_ignored():
    pool, rec = _buffers()
    t = pool.take((64,), torch.float32)
    pool.release(t)
    pool.release(torch.empty(64))  # never taken here: nothing to keep
    u = pool.take((64,), torch.int32)  # same bytes, other dtype: a new buffer, the spare unlocked to stay in the peak
    assert u.dtype == torch.int32 and pool.reuses == 0 and rec.unlocks == 1
    pool.close()
    assert not rec.locked


def test_tier_set_keeps_released_homes_locked_for_the_next(tmp_path):
    tiers = TierSet(torch.device("cpu"), tmp_path)
    rec = Recorder()
    tiers.pin_memory = True  # as on a GPU device, with the recorder in CUDA's place
    tiers.page_locked = PageLockedBuffers(aligned_empty, rec.lock, rec.unlock)
    homes = [tiers.empty(Tier.CPU, (8, 32), torch.float16, lasting=True) for _ in range(2)]
    staging = tiers.empty(Tier.CPU, (8, 32), torch.float16)  # per-step staging: torch's allocator, not locked
    for t in (*homes, staging):
        tiers.release(Tier.CPU, t)
    assert tiers.current[Tier.CPU] == 0 and tiers.peak[Tier.CPU] == 3 * 8 * 32 * 2
    again = [tiers.empty(Tier.CPU, (8, 32), torch.float16, lasting=True) for _ in range(2)]
    assert tiers.page_locked.locks == 2 and tiers.page_locked.reuses == 2
    assert {t.data_ptr() for t in again} == {t.data_ptr() for t in homes}
    tiers.close()
    assert not rec.locked
