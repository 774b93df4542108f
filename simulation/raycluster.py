"""A throw-away Ray cluster on loopback: a head and further nodes, each a `ray start --block` process.

Why: the Ray-cluster test and `slmfed bench multisite --test-cluster` need a cluster that the runner did
not start (as a research group's cluster is), on one machine. Each node gets a bare environment, so
nothing reaches its workers by inheritance from the process that submits the study, and the cluster is
stopped by PID (each `ray start` process and its descendants), never with the global `ray stop`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.processes import alive, descendants, free_port

BIN = Path(sys.executable).parent


def stop_pids(pids: list[int], grace: float = 20.0) -> None:
    """SIGTERM these PIDs, SIGKILL whatever is left after `grace`."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class LoopbackRayCluster:
    """`with LoopbackRayCluster(nodes=2, log_dir=...) as c:` then `c.address`; stopped on exit."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, log_dir: str | Path | None = None,
                 object_store_mb: int = 100):
        self.nodes, self.cpus, self.store = nodes, cpus_per_node, object_store_mb * 1024**2
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="slmfed-raycluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="slmrc-", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self.env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(cpus_per_node)),
                    "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, args: list[str], name: str) -> None:
        log = (self.log_dir / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
             "--object-store-memory", str(self.store), "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def alive_nodes(self) -> int:
        code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                "print(sum(1 for x in ray.nodes() if x['Alive'])); ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True, timeout=120)
        lines = out.stdout.strip().splitlines()
        return int(lines[-1]) if out.returncode == 0 and lines and lines[-1].isdigit() else 0

    def _wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a `ray start` of the test cluster exited; see {self.log_dir}")
            if self.alive_nodes() >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"the test Ray cluster at {self.address} did not reach {n} nodes in {timeout:.0f} s")

    def __enter__(self) -> "LoopbackRayCluster":
        try:
            self._start(["--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", self.temp_dir],
                        "head")
            self._wait(1, 120)
            for i in range(1, self.nodes):
                self._start(["--address", self.address], f"node{i + 1}")
            self._wait(self.nodes, 120)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.pids = [q for p in self.procs for q in [*descendants(p.pid), p.pid]]
        stop_pids(self.pids)
        for p in self.procs:
            p.wait(timeout=30)
        if not any(alive(p) for p in self.pids):
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's session files of this cluster only

    def __exit__(self, *exc) -> None:
        self.stop()
