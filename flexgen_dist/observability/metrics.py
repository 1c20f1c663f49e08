"""The Prometheus exporter of one run, served from the driver (`--metrics-port`).

Run-level families (tokens, requests, throughput, time per output token, decode row-steps, pending sequences) are
updated by the run loop as each step's tokens arrive. Per-stage families (compute, I/O, idle seconds, bytes moved,
memory per tier) are read from the stages at scrape time, through whatever executor runs them: this module knows
nothing of Ray. Why one endpoint on the driver rather than Ray's own metrics export: docs/observability.md.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flexgen_dist.base.errors import UserError
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.runtime.stage_snapshot import StageSnapshot

# Offloaded decode steps take from milliseconds (a small resident model) to minutes (175B streamed from disk).
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUEST_TIMEOUT_S = 30.0  # a client silent this long mid-request is dropped (the end of a run waits for requests)

SnapshotSource = Callable[[], Sequence[StageSnapshot | None]]


class StageFamilies(Collector):
    """Per-stage families, read from a snapshot source at each scrape (so they move while a step runs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes arrive on several server threads
        self._source: SnapshotSource | None = None
        self._last: list[StageSnapshot | None] = []  # per stage, the newest figures read
        self._high: dict[tuple[str, tuple[str, ...]], float] = {}  # exported counter values, which never go down

    @contextlib.contextmanager
    def reading(self, source: SnapshotSource) -> Iterator[None]:
        """Read from `source` inside the block; after it (the stages are going away) keep showing the last figures."""
        with self._lock:
            self._source = source
        try:
            yield
        finally:
            with self._lock:
                self._source = None

    def refresh(self) -> None:
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        if self._source is None:
            return
        fresh = list(self._source())
        # A stage that did not answer in time keeps its previous figures.
        self._last = [new if new is not None else (self._last[i] if i < len(self._last) else None)
                      for i, new in enumerate(fresh)]

    def describe(self) -> list[Metric]:
        return self._families([])

    def collect(self) -> list[Metric]:
        with self._lock:
            self._refresh()
            return self._families(self._last)

    def _families(self, snapshots: Sequence[StageSnapshot | None]) -> list[Metric]:
        compute = CounterMetricFamily("flexgen_stage_compute_seconds",
                                      "Seconds a stage spent in steps, not stalled on transfers", labels=["stage"])
        io = CounterMetricFamily("flexgen_stage_io_seconds", "Seconds a stage spent in transfers, by kind "
                                 "(weights, cache); overlaps compute when transfers overlap", labels=["stage", "kind"])
        io_wait = CounterMetricFamily("flexgen_stage_io_wait_seconds", "Seconds a stage's steps stalled on transfers, "
                                      "by kind (weights, cache, drain)", labels=["stage", "kind"])
        io_bytes = CounterMetricFamily("flexgen_io_bytes", "Bytes a stage moved between tiers",
                                       labels=["stage", "src", "dst"])
        idle = CounterMetricFamily("flexgen_stage_idle_seconds",
                                   "Seconds a stage waited between steps since its first step", labels=["stage"])
        memory = GaugeMetricFamily("flexgen_memory_bytes", "Bytes a stage has allocated in each tier",
                                   labels=["stage", "tier"])
        for i, snap in enumerate(snapshots):
            if snap is None:
                continue
            stage = str(i)
            self._count(compute, (stage,), snap.compute_s)
            self._count(idle, (stage,), snap.idle_s)
            for kind, seconds in snap.io_s.items():
                self._count(io, (stage, kind), seconds)
            for kind, seconds in snap.io_wait_s.items():
                self._count(io_wait, (stage, kind), seconds)
            for (src, dst), nbytes in snap.io_bytes.items():
                self._count(io_bytes, (stage, src, dst), nbytes)
            for tier, nbytes in snap.memory_bytes.items():
                memory.add_metric([stage, tier], nbytes)
        return [compute, io, io_wait, io_bytes, idle, memory]

    def _count(self, family: CounterMetricFamily, labels: tuple[str, ...], value: float) -> None:
        key = (family.name, labels)
        self._high[key] = max(self._high.get(key, 0.0), value)
        family.add_metric(list(labels), self._high[key])


class _ScrapeWatch(Collector):
    """Yields nothing; notes that a scrape began. Registered first, so a scrape noted after `finish()` has read every
    family after the run's last update."""

    def __init__(self) -> None:
        self.scraped = threading.Event()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self.scraped.set()
        return []


class RunMetrics:
    """Every family of one run, in a registry of its own (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._watch = _ScrapeWatch()
        self.registry.register(self._watch)
        r = self.registry
        self._generated = Counter("flexgen_generated_tokens", "Tokens generated, counted as each step returns",
                                  registry=r)
        self._prompt = Counter("flexgen_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self._requests = Counter("flexgen_requests", "Requests answered, by how: a sequence finished and written, by "
                                 "finish reason (eos: EOS token, stop: a stop string, length: max new tokens), or an "
                                 "error record for a request that could not run (error)", ["status"], registry=r)
        for status in ("eos", "stop", "length", "error"):  # known in advance: exported from the start, at 0
            self._requests.labels(status)
        self._throughput = Gauge("flexgen_generation_throughput_tokens_per_second",
                                 "Generated tokens over seconds since the first step (as in the run's summary)",
                                 registry=r)
        self._throughput.set_function(self._throughput_now)
        self._time_per_output_token = Histogram(
            "flexgen_time_per_output_token_seconds", "Seconds between successive output tokens of a block's "
            "sequences (one observation per decode step)", buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS, registry=r)
        # A block steps until its last sequence stops: the rows of those that stopped earlier are computed for
        # nothing. Both states exported from the start, so a run without waste shows finished at 0.
        self._row_steps = Counter("flexgen_decode_row_steps", "Rows computed by decode steps, by whether the row's "
                                  "sequence was still running (live) or had already stopped (finished)", ["state"],
                                  registry=r)
        for state in ("live", "finished"):
            self._row_steps.labels(state)
        self._pending = Gauge("flexgen_pending_sequences", "Sequences of this run not finished yet", registry=r)
        self._budget = Gauge("flexgen_memory_budget_bytes", "Each stage's --max-memory budget per tier", ["tier"],
                             registry=r)
        self._placement = Gauge("flexgen_stage_placement_percent", "Each stage's placement: the percent of a tensor "
                                "kind (weights, cache, activations) it keeps on each tier", ["stage", "tensor", "tier"],
                                registry=r)
        self._restarts = Counter("flexgen_stage_restarts", "Stage processes lost and restarted (the blocks in flight "
                                 "replayed)", ["stage"], registry=r)
        self.stages = StageFamilies()
        self.registry.register(self.stages)
        self._generated_count = 0
        self._start: float | None = None
        self._end: float | None = None

    def set_budget(self, budget: MemoryBudget) -> None:
        for field in fields(budget):
            limit = getattr(budget, field.name)
            if limit is not None:
                self._budget.labels(field.name).set(limit)

    def set_stage_placement(self, stage: int, percents: dict[str, tuple[float, float, float]]) -> None:
        """`percents`: tensor kind -> (gpu, cpu, disk) percent, as the stage's policy places it."""
        for tensor, shares in percents.items():
            for tier, percent in zip(("gpu", "cpu", "disk"), shares):
                self._placement.labels(str(stage), tensor, tier).set(percent)

    def run_started(self, sequences: int) -> None:
        self._pending.set(sequences)
        self._start = time.perf_counter()

    def prefill_done(self, prompt_tokens: int, new_tokens: int) -> None:
        self._prompt.inc(prompt_tokens)
        self._count_generated(new_tokens)

    def decode_done(self, new_tokens: int, finished_rows: int, latency_s: float) -> None:
        """`new_tokens`: one per live row; `finished_rows`: rows of sequences that had stopped before the step."""
        self._time_per_output_token.observe(latency_s)
        self._count_generated(new_tokens)
        self._row_steps.labels("live").inc(new_tokens)
        self._row_steps.labels("finished").inc(finished_rows)

    def stage_restarted(self, stage: int) -> None:
        self._restarts.labels(str(stage)).inc()

    def requests_refused(self, count: int) -> None:
        """Error records written for requests that could not run (an OpenAI batch file's bad lines)."""
        self._requests.labels("error").inc(count)

    def sequences_finished(self, finish_reasons: Iterable[str]) -> None:
        for reason in finish_reasons:
            self._requests.labels(reason).inc()
            self._pending.dec()

    def finish(self) -> None:
        """The run's last figures are in: read the stages once more while they exist, stop the throughput clock."""
        self._end = time.perf_counter()
        self.stages.refresh()
        self._watch.scraped.clear()

    def wait_for_scrape(self, timeout_s: float) -> None:
        """After `finish()`: wait until a scrape has read the final figures, at most `timeout_s`."""
        self._watch.scraped.wait(timeout_s)

    def _count_generated(self, n: int) -> None:
        self._generated.inc(n)
        self._generated_count += n

    def _throughput_now(self) -> float:
        if self._start is None:
            return 0.0
        elapsed = (self._end if self._end is not None else time.perf_counter()) - self._start
        return self._generated_count / elapsed if elapsed > 0 else 0.0


@contextlib.contextmanager
def serve(metrics: RunMetrics, host: str, port: int, linger_s: float = 0.0) -> Iterator[str]:
    """Serve `metrics` on http://host:port/metrics inside the block (yields that URL). When the block ends normally,
    keep serving until a scrape has read the final figures, at most `linger_s` seconds: a short job's last values
    would otherwise never reach Prometheus."""
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:  # port in use, a host name that does not resolve, an address not on this machine
        raise UserError(f"--metrics-port {port}: cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    # Request threads are joined by server_close(), so the scrape that ends the linger is answered in full before the
    # process exits (prometheus_client makes them daemons, which exit cuts off mid-response).
    server.daemon_threads = False
    server.RequestHandlerClass = type("TimedHandler", (server.RequestHandlerClass,), {"timeout": REQUEST_TIMEOUT_S})
    try:
        yield f"http://{host}:{port}/metrics"
        if linger_s > 0:
            metrics.wait_for_scrape(linger_s)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
