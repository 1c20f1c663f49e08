"""Everything Ray: connecting (or starting an embedded cluster on 127.0.0.1), a placement group with one bundle per
stage, one StageWorker actor per bundle, and the executor calls as actor method calls chained by object refs."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import torch

from flexgen_dist.errors import UserError
from flexgen_dist.generation import Sampling
from flexgen_dist.runtime.stage_snapshot import StageSnapshot
from flexgen_dist.runtime.worker import StageSpec, StageWorker
from flexgen_dist.scoring import Scoring

READY_TIMEOUT_S = float(os.environ.get("FLEXGEN_RAY_READY_TIMEOUT_S", "600"))  # loading a big slice takes minutes
PLACEMENT_TIMEOUT_S = float(os.environ.get("FLEXGEN_RAY_PLACEMENT_TIMEOUT_S", "60"))
SNAPSHOT_TIMEOUT_S = 2.0  # a scrape waits this long for the stages, then shows their last figures
# An actor thread of its own for snapshots: with max_concurrency=1 the steps still run one at a time and in order, and
# a snapshot does not wait for them. It does wait while an earlier call still waits for its argument (a stage's
# next step for the previous stage's output): Ray starts an actor's calls in order.
MONITOR_GROUP = "monitor"


def _connect(address: str | None) -> bool:
    """Join a cluster (explicit address, or RAY_ADDRESS as set by `ray job submit`) or start an embedded one.
    Returns True when this process started the cluster (and so must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    with _keeping_sigterm_handler():
        return _init(target)


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """ray.init replaces SIGTERM's handler (with sys.exit, and its C++ side with one that aborts); keep the caller's,
    which unwinds the run: stages delete their files, the embedded cluster stops (cli.exit_code)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init(target: str | None) -> bool:
    import ray

    try:
        if target:
            ray.init(address=target, log_to_driver=True, configure_logging=False)
            return False
        # "local": never attach to a stale cluster by accident; loopback only, no dashboard.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                 log_to_driver=True)
        return True
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at {target}: {e} (is it running? check `ray status`)") from None


def _unwrap(e: Exception) -> Exception:
    """A UserError raised inside an actor arrives wrapped; give the user its one line."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, (UserError, OSError)) else e


class RayExecutor:
    def __init__(self, specs: list[StageSpec], address: str | None, placement_strategy: str = "PACK") -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.num_stages = len(specs)
        self._owns_cluster = _connect(address)
        self._remove_pg = remove_placement_group
        self.actors: list[Any] = []
        self._snapshot_refs: list[Any] = []  # per stage, a snapshot call not yet answered (reused, not repeated)
        self._pg = None
        try:
            gpu = specs[0].device != "cpu" and _cluster_has_gpus()
            # A CPU-only stage gets an equal share of one node's cores (fractional shares are fine for Ray); a share
            # of the whole cluster could exceed every node. Spread over several nodes this under-asks, never over-asks.
            node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
            cpu_share = 1.0 if gpu else max(node_cpus / self.num_stages, 0.01)
            bundles = [{"GPU": 1, "CPU": 1} if gpu else {"CPU": cpu_share} for _ in specs]
            self._pg = placement_group(bundles, strategy=placement_strategy)
            ready, _ = ray.wait([self._pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
            if not ready:
                raise UserError(f"the Ray cluster cannot place {self.num_stages} stages of {bundles[0]} with "
                                f"{placement_strategy} within {PLACEMENT_TIMEOUT_S:.0f} s (cluster has "
                                f"{_resources(ray.cluster_resources())}); check `ray status`")
            worker_cls = ray.remote(concurrency_groups={MONITOR_GROUP: 1})(StageWorker)
            for i, spec in enumerate(specs):
                if not gpu:
                    spec = _with_threads(spec, max(1, int(cpu_share)))
                self.actors.append(worker_cls.options(
                    num_cpus=bundles[i]["CPU"], num_gpus=bundles[i].get("GPU", 0), max_concurrency=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
                ).remote(spec))
            self._get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S,
                      what=f"stage actors to load their layers within {READY_TIMEOUT_S:.0f} s")
            self._snapshot_refs = [None] * len(self.actors)
        except BaseException:
            self.shutdown()
            raise

    def _get(self, refs, timeout: float | None = None, what: str = "a stage"):
        import ray

        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"timed out waiting for {what}; check `ray status` and the actor logs") from None
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None

    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int, head: Sampling | Scoring) -> None:
        for a in self.actors:  # no wait: each actor runs its calls in order, so this precedes the block's first step
            a.start_block.remote(block_id, batch_sizes, capacity, head)

    def submit_step(self, block_id: int, tokens: list[torch.Tensor], valid: list[torch.Tensor]):
        ref = self.actors[0].step.remote(block_id, tokens, valid)
        for a in self.actors[1:]:
            ref = a.step.remote(block_id, ref, valid)  # a top-level ref: Ray hands the value actor to actor
        return ref

    def wait_any(self, handles: list[Any]) -> int:
        import ray

        ready, _ = ray.wait(handles, num_returns=1)
        return handles.index(ready[0])

    def result(self, handle) -> list[torch.Tensor]:
        return self._get(handle)

    def end_block(self, block_id: int) -> None:
        for a in self.actors:
            a.end_block.remote(block_id)

    def stats(self) -> list[dict]:
        return self._get([a.stats.remote() for a in self.actors], timeout=60, what="stage statistics")

    def stage_snapshots(self) -> list[StageSnapshot | None]:
        import ray

        if not self._snapshot_refs:  # not started, or shut down
            return []
        refs = self._snapshot_refs = [
            ref if ref is not None else actor.snapshot.options(concurrency_group=MONITOR_GROUP).remote()
            for ref, actor in zip(self._snapshot_refs, self.actors)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=SNAPSHOT_TIMEOUT_S)
        snapshots: list[StageSnapshot | None] = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                snapshots.append(None)
                continue
            self._snapshot_refs[i] = None
            try:
                snapshots.append(ray.get(ref))
            except ray.exceptions.RayError:  # a failed stage: the run itself reports it
                snapshots.append(None)
        return snapshots

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=60)  # deletes the stage's offload files
            except Exception:
                pass  # a dead actor has nothing left to close
            ray.kill(a)
        self.actors = []
        self._snapshot_refs = []
        if self._pg is not None:
            self._remove_pg(self._pg)
            self._pg = None
        if self._owns_cluster:
            ray.shutdown()


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:"))


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _with_threads(spec: StageSpec, threads: int) -> StageSpec:
    from dataclasses import replace

    return replace(spec, threads=threads)
