"""A real multi-node Ray cluster on this machine: a head that hosts no stage and worker nodes of one CPU each, every
one its own raylet on 127.0.0.1. STRICT_SPREAD puts each stage on a node of its own; when a stage's node is lost
mid-run (its raylet SIGKILLed), Ray restarts the stage on a spare node and the run completes with the output of an
undisturbed run. Each node has a cache directory of its own, as separate machines do: `--policy auto` measures and
caches each node's profile there. The runs are subprocesses: a test process's own Ray connection would pin them to
another cluster."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import _free_port

RAY = str(Path(sys.executable).parent / "ray")
PROMPTS = [[4 + (7 * i + j) % 400 for j in range(3 + i % 5)] for i in range(24)]
MAX_NEW = 24
HALF_ON_DISK = ("--percent", "50", "50", "100", "0", "100", "0")  # half the weights on disk, half in memory
# Node loss is noticed after this many missed health checks of this period: seconds, not Ray's default half-minute.
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
               "RAY_health_check_failure_threshold": "3"}


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.gcs, self.nodes = tmp, _free_port(), []
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0", **FAST_HEALTH}
        self.address = f"127.0.0.1:{self.gcs}"
        self.head = self._start(["--head", f"--port={self.gcs}", "--num-cpus=0", "--include-dashboard=false"], "head")

    def _start(self, flags: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 f"--dashboard-agent-listen-port={_free_port()}", *flags],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, "XDG_CACHE_HOME": str(self.cache(name))})

    def cache(self, name: str) -> Path:
        """A node's own cache directory (its workers inherit it from its raylet)."""
        return self.tmp / "cache" / name

    def add_node(self) -> subprocess.Popen:
        """A worker node of one CPU, once the cluster sees it alive."""
        node = self._start([f"--address={self.address}", "--num-cpus=1"], f"node{len(self.nodes)}")
        self.nodes.append(node)
        deadline = time.monotonic() + 120
        while not self._alive(node):
            if time.monotonic() > deadline or node.poll() is not None:
                pytest.fail(f"a worker node did not join in 120 s: {(self.tmp / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        return node

    def _alive(self, node: subprocess.Popen) -> bool:
        try:
            wanted = node_id(node)
        except (StopIteration, psutil.Error):  # its raylet has not started yet
            return False
        # Ray may forward a raylet's log line (a node just lost) to this probe's stdout: read only the marked line.
        code = ("import json, ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
                "print('NODES ' + json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        lines = [line for line in out.stdout.splitlines() if line.startswith("NODES ")]
        return out.returncode == 0 and bool(lines) and wanted in json.loads(lines[-1].removeprefix("NODES "))

    def stop(self) -> None:
        for proc in [*self.nodes, self.head]:
            proc.terminate()
        for proc in [*self.nodes, self.head]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def raylet(node: subprocess.Popen) -> psutil.Process:
    return next(p for p in psutil.Process(node.pid).children(recursive=True) if "raylet" in p.name())


def node_id(node: subprocess.Popen) -> str:
    """The Ray node id of one of our nodes, as its raylet passes it to the node's dashboard agent."""
    return next(m.group(1) for a in raylet(node).cmdline() if (m := re.search(r"--node-id=([0-9a-f]+)", a)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("multinode"))
    try:
        c.add_node()
        c.add_node()
        yield c
    finally:
        c.stop()


def _generate(cluster: Cluster, model_dir: Path, tmp: Path, name: str,
              policy: tuple[str, ...] = HALF_ON_DISK) -> tuple[subprocess.Popen, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp / f"{name}.jsonl"
    argv = [sys.executable, "-m", "flexgen_dist", "generate", "--model", str(model_dir), "--prompts", str(prompts),
            "--max-new-tokens", str(MAX_NEW), "--ignore-eos", "--dtype", "float32", "--device", "cpu",
            "--gpu-batch-size", "2", *policy, "--stages", "2",
            "--placement-strategy", "STRICT_SPREAD", "--cpus-per-stage", "1", "--ray-address", cluster.address,
            "--offload-dir", str(tmp / "offload"), "--output", str(out), "--quiet"]
    env = {**cluster.env, "XDG_CACHE_HOME": str(cluster.cache("driver"))}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), out


def _finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _outputs(path: Path) -> dict:
    return {r["id"]: r["output_ids"] for r in map(json.loads, path.read_text().splitlines())}


def test_policy_auto_measures_each_stage_on_its_own_node(cluster, opt_postln_dir, tmp_path):
    """No --hardware: each stage's node measures itself (one thread: the stage's one CPU) within the run's budget
    and caches it in its own directory; the driver measures nothing. A second run reads the nodes' caches."""
    auto = ("--policy", "auto", "--max-memory", "gpu=32MiB,cpu=32MiB")
    proc, out = _generate(cluster, opt_postln_dir, tmp_path / "first", "first", auto)
    first = _finish(proc)
    assert len(_outputs(out)) == len(PROMPTS)
    caches = [cluster.cache(f"node{i}") / "flexgen_dist" / "hardware-cpu-1t.yaml" for i in range(2)]
    assert all(path.is_file() for path in caches) and not cluster.cache("driver").exists()
    assert len(first["policy_search"]["stages"]) == 2
    measured = [path.stat().st_mtime_ns for path in caches]
    proc, out = _generate(cluster, opt_postln_dir, tmp_path / "second", "second", auto)
    second = _finish(proc)
    assert [path.stat().st_mtime_ns for path in caches] == measured  # read, not measured again
    # The same profiles give the same block shapes. The placement fractions may not: on this tiny model the placement
    # LP has near-ties that CBC breaks differently from run to run (seen once in three runs, 2026-12-07: stage 0's
    # cache 100% in memory one run, partly on disk the next; each stage's disk budget, the node's free space, differed).
    shapes = [[(p["gpu_batch_size"], p["num_gpu_batches"]) for p in run["stage_policies"]] for run in (first, second)]
    assert shapes[0] == shapes[1]


def test_stages_spread_over_nodes_and_survive_a_lost_node(cluster, opt_postln_dir, tmp_path):
    proc, clean_out = _generate(cluster, opt_postln_dir, tmp_path / "clean", "clean")
    clean = _finish(proc)
    nodes = {node_id(n) for n in cluster.nodes}
    placed = [s["node_id"] for s in clean["stage_stats"]]
    assert len(set(placed)) == 2 and set(placed) <= nodes, "STRICT_SPREAD: each stage on a worker node of its own"

    # Both worker nodes hold a stage. Lose one mid-run; only then does a spare join, so the stage can only come back
    # there (STRICT_SPREAD: not beside the other stage), and the run waits for it meanwhile.
    victim = cluster.nodes[1]
    proc, lost_out = _generate(cluster, opt_postln_dir, tmp_path / "lost", "lost")
    deadline = time.monotonic() + 300
    while not (lost_out.exists() and lost_out.read_text().count("\n") >= 2):  # a block written: mid-run
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the node could be lost"
        time.sleep(0.05)
    victim_id = node_id(victim)
    raylet(victim).send_signal(signal.SIGKILL)
    spare = cluster.add_node()
    summary = _finish(proc)

    assert summary["stage_restarts"] >= 1
    moved = [s["node_id"] for s in summary["stage_stats"]]
    assert victim_id not in moved and node_id(spare) in moved, moved
    assert _outputs(lost_out) == _outputs(clean_out)
    assert len(_outputs(lost_out)) == len(PROMPTS)
    # The restarted stage cleared its directory where it started, and every stage deleted its files at the end.
    assert not any(p.is_file() for p in (tmp_path / "lost" / "offload").rglob("*"))
