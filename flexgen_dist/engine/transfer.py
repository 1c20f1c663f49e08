"""Background transfer lanes: how the engine overlaps loads and stores with compute.

A lane is a worker thread (disk reads release the GIL) and, on CUDA, a stream of its own. Work submitted to a lane
runs after the compute already queued when it was submitted (an event fence), and its result is ready on the device
when the future resolves. A one-worker lane runs its work in order; a lane of several workers runs that many pieces at
once, each worker on its own stream, in no order between them. With overlap off, work runs inline: the same code
path, serialized.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class Lane:
    def __init__(self, device: torch.device, overlap: bool, name: str, workers: int = 1) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        # On a CPU device a lane's own torch work (memory copies, cache loads) runs single-threaded: an OpenMP team
        # of its own makes libgomp count more threads than cores and stop spinning between parallel regions, for
        # every team. Compute's threads then sleep and wake around each of its small kernels (docs/benchmark-history.md:
        # with the dequantization moved too, 4-bit opt-1.3b decode steps took 0.72x as long).
        single = {} if self.cuda else {"initializer": torch.set_num_threads, "initargs": (1,)}
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name, **single) if overlap else None
        self._streams = threading.local()  # each worker thread's CUDA stream, made on its first work
        self._pending: list[Future] = []

    def submit(self, fn: Callable[..., T], *args) -> Future:
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # surfaces at .result(), or at drain() for work nobody waits on
                future.set_exception(e)
        else:
            fence = None
            if self.cuda:
                fence = torch.cuda.Event()
                fence.record()  # on the compute stream: the lane must not touch buffers compute still uses
            future = self._executor.submit(self._run, fence, fn, args)
        # Work that finished without error has nothing left for drain() to report: dropping it here lets its result
        # (a staged KV copy) be freed once its consumer is done with it, not when the step ends, which held every
        # layer's staged cache of a step at once (~0.9 GB over the plan for opt-1.3b, 2 x 32 sequences, cache on disk).
        self._pending = [f for f in self._pending if not f.done() or f.cancelled() or f.exception() is not None]
        self._pending.append(future)
        return future

    def _run(self, fence, fn: Callable[..., T], args) -> T:
        if not self.cuda:
            return fn(*args)
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(fence)
            result = fn(*args)
            stream.synchronize()  # the result is complete on the device before the future resolves
        return result

    def drain(self) -> None:
        """Wait for everything submitted so far; re-raise the first failure."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
