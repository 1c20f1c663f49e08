"""A stage actor (and the profiler task in its place) takes the priority of the raylet that started it: `ray start`
runs workers at nice 15, below Ray's own daemons, which then preempt the stages wherever the stages fill the cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A worker started at nice 15 under its raylet (here: the test process), every thread of it, as Ray starts them.
WORKER = """
import os, threading
os.nice(15)
started = threading.Event()
threading.Thread(target=started.wait, daemon=True).start()  # a thread of its own, from before
from flexgen_dist.runtime.ray_executor import _at_raylet_priority
_at_raylet_priority()
tids = os.listdir("/proc/self/task")
print(sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in tids}), len(tids))
started.set()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_a_stage_takes_the_raylets_priority_on_every_thread() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if "below Ray's daemons" in out.stderr:  # not permitted to raise a priority here: it said so, in one line
        assert len(out.stderr.strip().splitlines()) == 1
        pytest.skip("raising a process's priority is not permitted here (no CAP_SYS_NICE)")
    priorities, threads = out.stdout.split(" ", 1)[0], int(out.stdout.rsplit(" ", 1)[1])
    assert priorities == f"[{own}]" and threads >= 2, out.stdout
