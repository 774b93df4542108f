"""Stops a local Ray once the process that started it has exited (`slmfed simulate`'s Ctrl-C).

Why a separate process: the driver cannot stop its own Ray and then exit with its own status, since
Ray's core worker ends the driver (status 1) as soon as the raylet it talks to dies. So the driver
hands the PIDs to this process, exits with 130, and this process stops exactly those PIDs: SIGTERM,
then SIGKILL to any still there after a grace period. Nothing else (no `ray stop`) is touched.

    python -m simulation.ray_reaper PARENT_PID TEMP_DIR PID...
"""
from __future__ import annotations

import shutil
import sys
import time

from common.processes import alive
from simulation.raycluster import stop_pids


def reap(parent: int, temp_dir: str, pids: list[int], wait_parent_s: float = 5.0, grace_s: float = 10.0) -> None:
    deadline = time.monotonic() + wait_parent_s
    while alive(parent) and time.monotonic() < deadline:
        time.sleep(0.02)
    stop_pids(pids, grace=grace_s)
    shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2], [int(p) for p in sys.argv[3:]])
