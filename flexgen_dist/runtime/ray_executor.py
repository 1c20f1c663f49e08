"""Everything Ray: connecting (or starting an embedded cluster on 127.0.0.1), a placement group with one bundle per
stage, tasks run in a stage's bundle before it starts (the profiler), one StageWorker actor per bundle, and the
executor calls as actor method calls chained by object refs.

A stage actor whose process dies (killed, out of memory, node lost) is restarted by Ray, up to MAX_STAGE_RESTARTS
times: its __init__ runs again and reloads the slice. Ray retries no call (max_task_retries=0): a step re-run alone
on a stage that lost the block's cache would be wrong, so the coordinator replays whole blocks instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from flexgen_dist.base.errors import RunFailed, UserError
from flexgen_dist.engine.generation import Decoding
from flexgen_dist.engine.scoring import Scoring
from flexgen_dist.engine.stage_engine import PrefillPart, RefillRows
from flexgen_dist.runtime import worker
from flexgen_dist.runtime.executor import StageLost
from flexgen_dist.runtime.stage_snapshot import StageSnapshot
from flexgen_dist.runtime.worker import StageSpec

READY_TIMEOUT_S = float(os.environ.get("FLEXGEN_RAY_READY_TIMEOUT_S", "600"))  # loading a big slice takes minutes
PLACEMENT_TIMEOUT_S = float(os.environ.get("FLEXGEN_RAY_PLACEMENT_TIMEOUT_S", "60"))
MAX_STAGE_RESTARTS = int(os.environ.get("FLEXGEN_MAX_STAGE_RESTARTS", "3"))  # per stage, over the run
RESTART_POLL_S = 0.5  # while Ray restarts a stage, calls to it fail at once: ask again this often
SNAPSHOT_TIMEOUT_S = 2.0  # a scrape waits this long for the stages, then shows their last figures
# An actor thread of its own for snapshots: with max_concurrency=1 the steps still run one at a time and in order, and
# a snapshot does not wait for them. It does wait while an earlier call still waits for its argument (a stage's
# next step for the previous stage's output): Ray starts an actor's calls in order.
MONITOR_GROUP = "monitor"
_KEPT = "Results already written are kept: run again with the same --output to resume."  # ends a lost run's line
# Errors a stage's __init__ raises as one line (by type name), and what the driver raises for each.
_ONE_LINE_ERRORS = {"UserError": UserError, "RunFailed": RunFailed, "OffloadDiskFull": RunFailed}


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
        # "local": never attach to a stale cluster by accident; loopback only, no dashboard. Ray starts workers at
        # nice 15, under its own daemons and our driver: a stage actor is the run's compute (and its disk reads).
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                 log_to_driver=True, _system_config={"worker_niceness": 0})
        return True
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at {target}: {e} (is it running? check `ray status`)") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _creation_error(e: Exception) -> Exception | None:
    """The error a stage's __init__ raised (e.g. the offload disk full while it writes its weights), as one line; None
    for any other loss. Ray does not restart such a stage, and hands over only the creation task's text, whose last
    line is the error's "module.Type: message"."""
    if not getattr(e, "actor_init_failed", False):
        return None
    kind, _, message = str(e).strip().splitlines()[-1].partition(": ")
    name = kind.rsplit(".", 1)[-1]
    if name in _ONE_LINE_ERRORS:
        return _ONE_LINE_ERRORS[name](message)
    return RunFailed(f"a stage failed to start: {name}: {message}")


def _unwrap(e: Exception) -> Exception:
    """A UserError raised inside an actor arrives wrapped; give the user its one line."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, (UserError, OSError)) else e


class RayExecutor:
    def __init__(self, num_stages: int, device: str | None, address: str | None, placement_strategy: str = "PACK",
                 cpus_per_stage: float | None = None) -> None:
        """Join (or start) the cluster and reserve one bundle per stage; `start` then loads a stage actor in each."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        self.num_stages = num_stages
        # Joined here (not by the caller beforehand): leave at the end, or Ray's forwarded worker and raylet log lines
        # may print after the summary, which must stay the last stdout line (seen when a node was lost mid-run).
        self._joined = not ray.is_initialized()
        self._owns_cluster = _connect(address)
        self._remove_pg = remove_placement_group
        self.actors: list[Any] = []
        self._snapshot_refs: list[Any] = []  # per stage, a snapshot call not yet answered (reused, not repeated)
        self._pids: list[int] = []  # per stage, the process that holds its blocks
        self._recoveries = 0
        self._pg = None
        try:
            cluster_gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
            gpu = cluster_gpus >= 1
            # Without --cpus-per-stage a CPU-only stage gets an equal share of one node's cores (fractional shares
            # are fine for Ray); a share of the whole cluster could exceed every node. Spread over several nodes this
            # under-asks, never over-asks.
            node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
            cpu_share = cpus_per_stage or (1.0 if gpu else max(node_cpus / num_stages, 0.01))
            self._bundles = [stage_bundle(cluster_gpus, num_stages, cpu_share) for _ in range(num_stages)]
            self._threads = None if gpu else max(1, int(cpu_share))  # a CPU stage's compute threads
            self._pg = placement_group(self._bundles, strategy=placement_strategy)
            ready, _ = ray.wait([self._pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
            if not ready:
                raise UserError(f"the Ray cluster cannot place {num_stages} stages of {self._bundles[0]} with "
                                f"{placement_strategy} within {PLACEMENT_TIMEOUT_S:.0f} s (cluster has "
                                f"{_resources(ray.cluster_resources())}); check `ray status`")
        except BaseException:
            self.shutdown()
            raise

    def _in_bundle(self, i: int) -> dict[str, Any]:
        """Ray options that put a task or an actor in stage i's bundle, with its resources."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": self._bundles[i]["CPU"], "num_gpus": self._bundles[i].get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)}

    def on_each_stage(self, fn: Callable[..., Any], *args: Any) -> list:
        """fn(*args) as a task in each stage's bundle (its node, its cores and threads), once per node: stages that
        share a node share its answer (measured at once, two stages would each see half of a shared disk)."""
        import ray
        from ray.util import placement_group_table

        nodes = placement_group_table(self._pg)["bundles_to_node_id"]
        first = {}  # node -> the first stage placed on it
        for i in range(self.num_stages):
            first.setdefault(nodes[i], i)
        # max_calls=1: the worker process exits after it, so what the measurement held returns to the node before the
        # stages load (an idle pooled worker would keep it).
        task = ray.remote(max_retries=0, max_calls=1)(_in_stage_place)
        refs = {i: task.options(**self._in_bundle(i)).remote(fn, self._threads, *args) for i in first.values()}
        results = dict(zip(refs, self._get(list(refs.values()), timeout=READY_TIMEOUT_S,
                                           what="the stages' nodes to measure their hardware")))
        return [results[first[nodes[i]]] for i in range(self.num_stages)]

    def start(self, specs: list[StageSpec]) -> None:
        import ray

        try:
            worker_cls = ray.remote(concurrency_groups={MONITOR_GROUP: 1})(StageWorker)
            for i, spec in enumerate(specs):
                if self._threads:
                    spec = _with_threads(spec, self._threads)
                self.actors.append(worker_cls.options(max_concurrency=1, max_restarts=MAX_STAGE_RESTARTS,
                                                      max_task_retries=0, **self._in_bundle(i)).remote(spec))
            self._pids = self._get([a.pid.remote() for a in self.actors], timeout=READY_TIMEOUT_S,
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
        # Before RayTaskError: a call whose argument came from a lost stage fails with an error that is both.
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:  # a process or a node is gone
            created = _creation_error(e)
            if created is not None:
                raise created from None
            cause = getattr(e, "cause", e)
            raise StageLost(f"a stage was lost while waiting for {what}: {_first_line(cause)}") from None
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None

    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int, head: Decoding | Scoring) -> None:
        for a in self.actors:  # no wait: each actor runs its calls in order, so this precedes the block's first step
            a.start_block.remote(block_id, batch_sizes, capacity, head)

    def submit_step(self, block_id: int, tokens: list[torch.Tensor], valid: list[torch.Tensor],
                    part: PrefillPart | None = None, refills: tuple[tuple[RefillRows, torch.Tensor], ...] = ()):
        ref = self.actors[0].step.remote(block_id, tokens, valid, part, refills)
        for a in self.actors[1:]:
            ref = a.step.remote(block_id, ref, valid, part, refills)  # a top-level ref: Ray hands it actor to actor
        return ref

    def wait_any(self, handles: list[Any]) -> int:
        import ray

        ready, _ = ray.wait(handles, num_returns=1)
        return handles.index(ready[0])

    def result(self, handle) -> list[torch.Tensor]:
        return self._get(handle, what="a step")

    def recover(self) -> list[int]:
        """Wait until every stage answers again, and return those whose process changed: restarted by Ray, their
        slices reloaded, their blocks gone. Bounded: Ray restarts a stage at most MAX_STAGE_RESTARTS times, and
        recoveries (a stage may be unreachable for a while without dying) are at most that many per stage."""
        self._recoveries += 1
        if self._recoveries > MAX_STAGE_RESTARTS * self.num_stages:
            raise RunFailed(f"stages were lost {self._recoveries} times; giving up (at most {MAX_STAGE_RESTARTS} "
                            f"per stage, FLEXGEN_MAX_STAGE_RESTARTS). {_KEPT}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        pids = [self._pid_when_up(i, deadline) for i in range(self.num_stages)]
        restarted = [i for i, (old, new) in enumerate(zip(self._pids, pids)) if old != new]
        self._pids = pids
        return restarted

    def _pid_when_up(self, stage: int, deadline: float) -> int:
        import ray

        while True:
            try:
                return ray.get(self.actors[stage].pid.remote(), timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:  # restarting (or unreachable): it may answer later
                if time.monotonic() >= deadline:
                    break
                time.sleep(RESTART_POLL_S)
            except ray.exceptions.ActorDiedError as e:  # Ray will not restart it: restarts spent, or __init__ failed
                created = _creation_error(e)
                if created is not None:
                    raise created from None
                raise RunFailed(f"stage {stage} was lost and not restarted (at most {MAX_STAGE_RESTARTS} restarts per "
                                f"stage, FLEXGEN_MAX_STAGE_RESTARTS): {_first_line(e)} {_KEPT}") from None
            except ray.exceptions.GetTimeoutError:
                break
        raise RunFailed(f"stage {stage} was lost and did not come back within {READY_TIMEOUT_S:.0f} s; check "
                        f"`ray status` and the actor logs. {_KEPT}")

    def end_block(self, block_id: int) -> None:
        for a in self.actors:
            a.end_block.remote(block_id)

    def stats(self) -> list[dict]:
        """Each stage's figures, with the Ray node it ran on last (its placement group bundle's: a stage restarted
        after its node was lost runs on another)."""
        from ray.util import placement_group_table

        stats = self._get([a.stats.remote() for a in self.actors], timeout=60, what="stage statistics")
        nodes = placement_group_table(self._pg).get("bundles_to_node_id", {})
        return [{**s, "node_id": nodes.get(i)} for i, s in enumerate(stats)]

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
        if self._owns_cluster or self._joined:
            ray.shutdown()  # stops an embedded cluster; from a joined one, only disconnects


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:"))


def stage_bundle(cluster_gpus: float, stages: int, cpus: float) -> dict[str, float]:
    """One stage's placement-group bundle: a GPU each where the cluster has one per stage; where it has fewer, the
    same fraction of one for every stage, so that whole numbers of stages share each GPU (two stages on one GPU:
    half each, within their own --max-memory gpu budgets; three on two: half each too, as 2/3 + 2/3 fits no GPU);
    none on a CPU-only cluster."""
    if cluster_gpus < 1:
        return {"CPU": cpus}
    return {"GPU": 1 / math.ceil(stages / int(cluster_gpus)), "CPU": cpus}


def _with_threads(spec: StageSpec, threads: int) -> StageSpec:
    from dataclasses import replace

    return replace(spec, threads=threads)


def _in_stage_place(fn: Callable[..., Any], threads: int | None, *args: Any) -> Any:
    """A task's body in a stage's bundle: with the compute threads and the priority the stage will have (Ray sets a
    task's OMP_NUM_THREADS from its CPUs, not torch's thread count)."""
    _at_raylet_priority()
    if threads:
        torch.set_num_threads(threads)
    return fn(*args)


def _at_raylet_priority() -> None:
    """Give every thread of this worker process the niceness of the raylet that started it. A cluster started with a
    plain `ray start` runs workers at nice 15, below Ray's own daemons and the driver, while a stage is the run's
    compute and its disk reads: where the stages fill the cores (S=2 on 2 cores), every daemon wake-up preempts one
    (launch/ray_head.sh and the embedded cluster start workers at 0 already). Where raising the priority is not
    permitted (no CAP_SYS_NICE), the stage stays as Ray started it and says so."""
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())
        for tid in map(int, os.listdir("/proc/self/task")):  # Linux's niceness is per thread
            if os.getpriority(os.PRIO_PROCESS, tid) > target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
    except FileNotFoundError:  # no /proc: not Linux
        pass
    except PermissionError:
        print(f"flexgen-dist: a stage runs at nice {os.getpriority(os.PRIO_PROCESS, 0)}, below Ray's daemons; start "
              "the cluster with RAY_worker_niceness=0 (launch/ray_head.sh does)", file=sys.stderr, flush=True)


class StageWorker(worker.StageWorker):
    """A stage as a Ray actor, at the raylet's priority (Ray names its actors by their class: StageWorker, as the
    state API and the dashboard have always listed them)."""

    def __init__(self, spec: StageSpec) -> None:
        _at_raylet_priority()
        super().__init__(spec)
