"""Stage failure. On a real local Ray cluster: a stage actor's process SIGKILLed mid-decode is restarted by Ray, the
blocks in flight are replayed, and the run's output is an undisturbed run's; once a stage's restarts are spent the run
fails with one line and keeps the blocks it finished. In process: the coordinator's replay, for generation and scoring,
against an executor whose stage loses its blocks at a chosen step."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import _free_port
from hf_oracle import hf_greedy
from test_metrics import _scrape

from flexgen_dist.runtime.executor import LocalExecutor, StageLost
from flexgen_dist.runtime.worker import StageSpec, StageWorker

MAX_NEW = 24
GPU_BATCH = 2  # one GPU batch per block: a block is two output lines
_rng = random.Random(7)
PROMPTS = [[_rng.randrange(4, 512) for _ in range(_rng.randint(4, 12))] for _ in range(12)]
SAMPLED = ("--temperature", "0.8", "--top-p", "0.9", "--seed", "3")  # the replay must redraw the same numbers
WAIT_S = 300  # a 2-core machine runs the driver, both stages and a restart: be patient


def _argv(model_dir: Path, tmp_path: Path, ray_address: str | None, *flags: str,
          command: str = "generate") -> list[str]:
    """A 2-stage float32 run on the CPU writing tmp_path/out.jsonl: on Ray at `ray_address`, else in process."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(PROMPTS)))
    executor = ["--executor", "ray", "--ray-address", ray_address] if ray_address else ["--executor", "local"]
    decoding = ["--max-new-tokens", str(MAX_NEW)] if command == "generate" else []
    return [command, "--model", str(model_dir), "--prompts", str(prompts), *decoding, "--dtype", "float32",
            "--device", "cpu", "--gpu-batch-size", str(GPU_BATCH), "--num-gpu-batches", "1",
            "--percent", "100", "0", "100", "0", "100", "0", "--stages", "2", *executor,
            "--output", str(tmp_path / "out.jsonl"), "--quiet", *flags]


def _records(path: Path) -> dict[str, dict]:
    """id -> the output's record for it; no id may be written twice."""
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"an id written twice: {ids}"
    return {r["id"]: r for r in records}


def _outputs(path: Path) -> dict[str, list[int]]:
    return {i: r["output_ids"] for i, r in _records(path).items()}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _alive_stage_pids(dashboard: str) -> list[int]:
    """The processes of the stage actors Ray reports alive, in stage order."""
    from ray.util.state import list_actors

    alive = list_actors(address=dashboard, filters=[("class_name", "=", "StageWorker"), ("state", "=", "ALIVE")],
                        detail=True)
    # repr_name is "StageWorker(layers A:B)" (StageWorker.__repr__): the stage with the lower first layer comes first.
    return [pid for _, pid in sorted((int(a.repr_name.split()[-1].split(":")[0]), a.pid) for a in alive
                                     if a.repr_name)]


def _stage_pid(dashboard: str, stage: int, other_than: int | None = None) -> int:
    """The process of the run's stage `stage` once Ray reports both stages alive, and this one in a process other than
    `other_than` (the one killed: Ray has restarted the stage)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pids = _alive_stage_pids(dashboard)
        if len(pids) == 2 and all(pids) and pids[stage] != other_than:
            return pids[stage]
        time.sleep(0.2)
    raise AssertionError(f"stage {stage} was not reported alive (in a process other than {other_than})")


@pytest.fixture
def dashboard(ray_cluster) -> str:
    """The cluster's state API, once no stage actor of an earlier run is alive: those found next are this test's."""
    deadline = time.monotonic() + WAIT_S
    while _alive_stage_pids(ray_cluster["dashboard"]):
        assert time.monotonic() < deadline, "stage actors of an earlier run are still alive"
        time.sleep(0.2)
    return ray_cluster["dashboard"]


class Saboteur(threading.Thread):
    """Kills stage `stage`'s process each time the output has reached the next of `after_lines` lines (the run being
    mid-decode on later blocks), Ray having restarted it in between; then scrapes `metrics_url` until stopped."""

    def __init__(self, out: Path, dashboard: str, stage: int, after_lines: list[int], metrics_url: str | None = None):
        super().__init__(daemon=True)
        self.out, self.dashboard, self.stage, self.after_lines = out, dashboard, stage, after_lines
        self.metrics_url = metrics_url
        self.killed: list[int] = []  # pids, in order
        self.lines_at_kill: list[int] = []
        self.scraped: dict | None = None  # the last scrape that answered
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for lines in self.after_lines:
                # The pid first, while the stages load or restart: the kill then follows the trigger at once.
                pid = _stage_pid(self.dashboard, self.stage, other_than=self.killed[-1] if self.killed else None)
                while _lines(self.out) < lines:
                    if self.stop.wait(0.02):
                        return
                self.lines_at_kill.append(_lines(self.out))
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
            while self.metrics_url and not self.stop.wait(0.2):
                try:
                    self.scraped = _scrape(self.metrics_url)
                except OSError:  # serving stopped
                    pass
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture(scope="module")
def clean_outputs(tmp_path_factory, ray_cluster, opt_preln_dir) -> Callable[[tuple[str, ...]], dict[str, list[int]]]:
    """Outputs of an undisturbed run with the given sampling flags, run once each; greedy ones are HF's."""
    from flexgen_dist.cli import main

    runs: dict[tuple[str, ...], dict[str, list[int]]] = {}

    def outputs(sampling: tuple[str, ...]) -> dict[str, list[int]]:
        if sampling not in runs:
            tmp = tmp_path_factory.mktemp("clean")
            assert main(_argv(opt_preln_dir, tmp, ray_cluster["address"], *sampling)) == 0
            runs[sampling] = _outputs(tmp / "out.jsonl")
            if not sampling:
                assert [runs[()][str(i)] for i in range(len(PROMPTS))] == hf_greedy(opt_preln_dir, PROMPTS, MAX_NEW)
        return runs[sampling]

    return outputs


@pytest.mark.parametrize("stage,sampling", [(0, ()), (1, ()), (1, SAMPLED)], ids=["stage0", "stage1", "stage1-sampled"])
def test_killed_stage_is_restarted_and_output_is_unchanged(tmp_path, ray_cluster, dashboard, opt_preln_dir,
                                                           clean_outputs, stage, sampling, capsys):
    from flexgen_dist.cli import main

    clean = clean_outputs(sampling)
    assert not sampling or clean != clean_outputs(()), "sampling drew only greedy tokens: a redraw would go untested"
    out, port = tmp_path / "out.jsonl", _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    saboteur = Saboteur(out, dashboard, stage, after_lines=[GPU_BATCH], metrics_url=url)
    saboteur.start()
    try:
        rc = main(_argv(opt_preln_dir, tmp_path, ray_cluster["address"], *sampling, "--metrics-port", str(port),
                        "--metrics-linger", "60"))
    finally:
        saboteur.stop.set()
        saboteur.join(timeout=WAIT_S)
    captured = capsys.readouterr()
    assert saboteur.error is None, saboteur.error
    assert rc == 0, captured.err[-2000:]
    assert len(saboteur.killed) == 1 and saboteur.lines_at_kill[0] < len(PROMPTS), "the kill came after the run"
    assert _outputs(out) == clean  # every id exactly once, token for token the undisturbed run's
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["stage_restarts"] == 1
    assert saboteur.scraped is not None and saboteur.scraped["flexgen_stage_restarts_total"] == {
        (("stage", str(stage)),): 1.0}


def test_spent_restarts_fail_with_one_line_and_keep_finished_blocks(tmp_path, ray_cluster, dashboard, opt_preln_dir,
                                                                    clean_outputs, capsys, monkeypatch):
    from flexgen_dist.cli import main
    from flexgen_dist.runtime import ray_executor

    monkeypatch.setattr(ray_executor, "MAX_STAGE_RESTARTS", 1)
    out = tmp_path / "out.jsonl"
    # The first kill is survived (one restart allowed); the second, a block later, is not.
    saboteur = Saboteur(out, dashboard, 1, after_lines=[GPU_BATCH, 2 * GPU_BATCH])
    saboteur.start()
    try:
        rc = main(_argv(opt_preln_dir, tmp_path, ray_cluster["address"]))
    finally:
        saboteur.stop.set()
        saboteur.join(timeout=WAIT_S)
    err = capsys.readouterr().err.strip()
    assert saboteur.error is None, saboteur.error
    assert len(saboteur.killed) == 2 and saboteur.lines_at_kill[1] < len(PROMPTS), "a kill came after the run"
    assert rc == 1 and len(err.splitlines()) == 1, err  # a failed run, not bad input
    assert "stage 1 was lost and not restarted" in err and "same --output to resume" in err, err
    kept, clean = _outputs(out), clean_outputs(())
    assert len(kept) >= 2 * GPU_BATCH and len(kept) < len(PROMPTS)
    assert kept == {i: clean[i] for i in kept}


class LosingExecutor(LocalExecutor):
    """In-process stages, of which the last loses its process at the `lose_at`-th step result, as a killed Ray stage
    does: a fresh StageWorker (slice reloaded, no blocks) takes its place, and the result fails with StageLost."""

    def __init__(self, num_stages: int, lose_at: int) -> None:
        super().__init__(num_stages)
        self.lose_at, self.results = lose_at, 0

    def start(self, specs: list[StageSpec]) -> None:
        super().start(specs)
        self.specs = specs

    def result(self, handle: list) -> list:
        self.results += 1
        if self.results == self.lose_at:
            self.workers[-1].close()
            self.workers[-1] = StageWorker(self.specs[-1])
            raise StageLost("stage lost")
        return handle

    def recover(self) -> list[int]:
        return [self.num_stages - 1]


# Lost at the first result: the blocks in flight are replayed from their prefill, sent in parts (2 stages: the
# default cuts each prefill, here into one part per sequence); at the 30th: mid-decode.
@pytest.mark.parametrize("lose_at", [1, 30], ids=["at-prefill", "mid-decode"])
@pytest.mark.parametrize("sampling", [(), SAMPLED], ids=["greedy", "sampled"])
def test_replayed_blocks_generate_what_an_undisturbed_run_does(tmp_path, opt_preln_dir, monkeypatch, sampling, lose_at,
                                                               capsys):
    from flexgen_dist import run
    from flexgen_dist.cli import main

    assert main(_argv(opt_preln_dir, tmp_path / "clean", None, *sampling)) == 0
    capsys.readouterr()
    monkeypatch.setattr(run, "make_executor", lambda run: LosingExecutor(run.stages, lose_at=lose_at))
    assert main(_argv(opt_preln_dir, tmp_path / "lost", None, *sampling)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stage_restarts"] == 1
    assert _records(tmp_path / "lost" / "out.jsonl") == _records(tmp_path / "clean" / "out.jsonl")


def test_replayed_blocks_score_what_an_undisturbed_run_does(tmp_path, opt_preln_dir, monkeypatch):
    """Scoring blocks are teacher-forced already; a replay must not add a step's NLL twice."""
    from flexgen_dist import score_run
    from flexgen_dist.cli import main

    flags = ("--decode-tokens", "3")  # a prefill and three decode steps per block (the shortest prompt has 4 tokens)
    assert main(_argv(opt_preln_dir, tmp_path / "clean", None, *flags, command="score")) == 0
    monkeypatch.setattr(score_run, "make_executor", lambda run: LosingExecutor(run.stages, lose_at=11))  # mid-decode
    assert main(_argv(opt_preln_dir, tmp_path / "lost", None, *flags, command="score")) == 0
    assert _records(tmp_path / "lost" / "out.jsonl") == _records(tmp_path / "clean" / "out.jsonl")
