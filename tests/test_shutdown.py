"""SIGTERM and SIGINT mid-run (issue 7's shutdown): the run unwinds like on any error — finished blocks stay written,
the stages delete their offload files, the embedded Ray cluster stops — and exits 143 / 130 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.parametrize("signum,code,message", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_cleans_up_and_keeps_finished_blocks(tmp_path, signum, code, message):
    out, offload = tmp_path / "out.jsonl", tmp_path / "offload"
    cmd = [sys.executable, "-m", "flexgen_dist", "generate", "--model", "opt-125m", "--dummy-weights", "--synthetic",
           "64", "--prompt-len", "16", "--max-new-tokens", "8", "--ignore-eos", "--percent", "0", "0", "0", "0", "100",
           "0", "--gpu-batch-size", "4", "--dtype", "float32", "--offload-dir", str(offload), "--output", str(out),
           "--quiet"]  # the default executor: one Ray stage actor on an embedded cluster; weights and cache on disk
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while _lines(out) < 4:  # a block written: mid-run, with the stage's disk tier in use
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no block finished in time"
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)  # the embedded cluster and the stage actor
        assert any(f.is_file() for f in offload.rglob("*")), "expected the stage's offload files mid-run"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-2000:]
    assert f"flexgen-dist: {message}" in stderr
    assert not [f for f in offload.rglob("*") if f.is_file()], "offload files left behind"
    written = out.read_text().splitlines()
    assert 4 <= len(written) < 64 and all(line.endswith("}") for line in written)  # whole lines, finished blocks
    psutil.wait_procs(started, timeout=30)
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "processes of the run left"
