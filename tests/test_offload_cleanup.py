"""Offload files of a lost stage (issue 7). Each stage of a run keeps its files under <offload root>/flexgen-<run id>-
stage<i>; a stage process that dies leaves them behind, and the process Ray restarts it in removes them before it
loads. Nothing but a directory of exactly that name is ever deleted."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_stage_restart import GPU_BATCH, PROMPTS, WAIT_S, _argv, _lines, _outputs, _stage_pid, dashboard  # noqa: F401

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.tiers import Tier, TierSet, new_run_id, stage_offload_dir
from flexgen_dist.runtime.worker import StageSpec, StageWorker

ON_DISK = ("--percent", "0", "0", "100", "0", "100", "0")  # weights on disk: every stage writes files as it loads


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _leftover(root: Path, run_id: str, stage: int) -> Path:
    """Files as a stage process killed mid-run leaves them: its TierSet's directory under the stage's name."""
    inner = root / f"flexgen-{run_id}-stage{stage}" / "flexgen-dead"
    inner.mkdir(parents=True)
    (inner / "000001-w.bin").write_bytes(b"w" * 4096)
    return inner


def test_a_predecessors_directory_is_removed_and_nothing_else(tmp_path):
    run_id, other_run = new_run_id(), new_run_id()
    _leftover(tmp_path, run_id, 1)
    kept = [_leftover(tmp_path, run_id, 0), _leftover(tmp_path, other_run, 1)]  # another stage, another run
    (tmp_path / "users-file.bin").write_bytes(b"u")
    (tmp_path / "flexgen-users-dir").mkdir()

    path = stage_offload_dir(tmp_path, run_id, 1)

    assert path == tmp_path / f"flexgen-{run_id}-stage1" and not path.exists()  # created on first use, not here
    assert all(p.is_dir() and _files(p) for p in kept)
    assert (tmp_path / "users-file.bin").read_bytes() == b"u" and (tmp_path / "flexgen-users-dir").is_dir()


def test_tierset_files_live_under_the_stage_directory_and_close_removes_them(tmp_path):
    path = stage_offload_dir(tmp_path / "root", new_run_id(), 0)
    tiers = TierSet(torch.device("cpu"), path)
    stored = tiers.empty(Tier.DISK, (4, 1024), torch.float32, "w")
    assert stored.path.parent.parent == path and stored.path.exists()
    tiers.close()
    assert not _files(tmp_path)


def test_something_else_bearing_the_name_is_refused_not_deleted(tmp_path):
    run_id = new_run_id()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    (tmp_path / f"flexgen-{run_id}-stage0").symlink_to(target)
    (tmp_path / f"flexgen-{run_id}-stage1").write_text("a file")
    for stage in (0, 1):
        with pytest.raises(UserError, match="not a directory this run made"):
            stage_offload_dir(tmp_path, run_id, stage)
    assert (target / "precious").read_text() == "keep"
    assert (tmp_path / f"flexgen-{run_id}-stage1").read_text() == "a file"
    with pytest.raises(ValueError):
        stage_offload_dir(tmp_path, "../../etc", 0)  # a run id is ours, never a path


def test_a_restarted_stage_worker_clears_its_predecessors_files(tmp_path, opt_preln_dir):
    """What Ray does after a stage's process is killed: a new StageWorker from the same spec, in a new process."""
    run_id = new_run_id()
    policy = Policy(w_gpu_percent=0, w_cpu_percent=0)
    spec = StageSpec(str(opt_preln_dir), False, 0, 0, 3, policy, "cpu", "float32", str(tmp_path), run_id=run_id,
                     stage=1)
    dead = _leftover(tmp_path, run_id, 1)
    sibling = _leftover(tmp_path, run_id, 0)

    worker = StageWorker(spec)
    stage_dir = tmp_path / f"flexgen-{run_id}-stage1"
    assert not dead.exists() and _files(stage_dir), "the predecessor's files stayed, or the weights are not on disk"
    assert _files(sibling)
    worker.close()
    assert not stage_dir.exists() and _files(sibling)


def test_killed_ray_stage_leaves_no_offload_files(tmp_path, ray_cluster, dashboard, opt_preln_dir, capsys):
    """A 2-stage Ray run, weights on disk, whose stage 1 is SIGKILLed mid-run: once Ray has restarted it, the stage's
    directory holds the new process's files only; after the run, no offload file is left."""
    from flexgen_dist.cli import main

    out, offload = tmp_path / "out.jsonl", tmp_path / "offload"
    seen: dict[str, object] = {}

    def kill_then_look() -> None:
        try:
            pid = _stage_pid(dashboard, 1)
            while _lines(out) < GPU_BATCH:
                time.sleep(0.02)
            (stage_dir,) = offload.glob("flexgen-*-stage1")
            seen["before"] = {p.name for p in stage_dir.iterdir()}
            os.kill(pid, signal.SIGKILL)
            _stage_pid(dashboard, 1, other_than=pid)  # alive again: its __init__ has loaded the slice
            seen["after"] = {p.name for p in stage_dir.iterdir()}
        except BaseException as e:  # reported by the test
            seen["error"] = e

    saboteur = threading.Thread(target=kill_then_look, daemon=True)
    saboteur.start()
    rc = main(_argv(opt_preln_dir, tmp_path, ray_cluster["address"], *ON_DISK, "--offload-dir", str(offload)))
    saboteur.join(timeout=WAIT_S)
    err = capsys.readouterr().err
    assert "error" not in seen, seen.get("error")
    assert rc == 0, err[-2000:]
    assert len(_outputs(out)) == len(PROMPTS)
    assert len(seen["before"]) == 1 and len(seen["after"]) == 1 and seen["before"] != seen["after"], seen
    assert offload.is_dir() and not list(offload.iterdir()), f"left behind: {_files(offload)}"
