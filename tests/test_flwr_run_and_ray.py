"""`flwr run .` (Flower's local simulation federation) and `slmfed simulate --ray-address` (a Ray
cluster this test starts, not the runner) give the same results rows as a plain `slmfed simulate`.

Every process started here is stopped by PID: the local SuperLink that `flwr run` leaves behind, and the
two `ray start --block` processes (head + a second node standing in for another machine) with their
descendants. Nothing global (`ray stop`) is used: other people's Ray on this machine stays untouched.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = {"scenario": "paper", "folds": 2, "num-rounds": 1, "local-epochs": 1, "models": "cf,dl", "cf-l2": 0.5}
K = 3  # the small cohort's folds cannot hold k = 10 patients of each class

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_pids(pids: list[int], grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL whatever of these PIDs is left after `grace`."""
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


def rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["rows"]


def simulate(data: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    flags = [x for k, v in SETTINGS.items() if k != "scenario" for x in (f"--{k}", str(v))]
    return subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--data", str(data), "--out", str(out),
                           *flags, "--min-cell-size", str(K), *extra],
                          capture_output=True, text=True, timeout=600, env=env or os.environ.copy(), cwd=out.parent)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from simulation.synth import generate_cohort

    data = tmp_path_factory.mktemp("cohort") / "small"
    generate_cohort(data, preset="small", seed=0, progress=False)
    return data


@pytest.fixture(scope="module")
def local_rows(cohort):
    """`slmfed simulate` on this machine: the reference rows (and the site caches, prepared once)."""
    out = cohort.parent / "run-local"
    proc = simulate(cohort, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rows(out)


def test_flwr_run_in_the_project_folder_gives_the_rows_of_slmfed_simulate(cohort, local_rows, tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    http, control = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "FLWR_LOCAL_CONTROL_API_PORT": str(control)}
    run_dir = tmp_path / "run-flwr"
    overrides = {**SETTINGS, "sim-data": str(cohort), "sim-min-cell-size": K, "run-dir": str(run_dir)}
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    superlink: list[int] = []
    try:
        proc = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "--run-config", run_config, "--stream"],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        superlink = [int(p) for p in subprocess.run(["pgrep", "-f", f"flower-superlink .*{home}"], capture_output=True,
                                                    text=True).stdout.split()]
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # `flwr run` exits 0 whatever became of the run: ask the SuperLink how it ended
        ls = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=tmp_path)
        runs = json.loads(ls.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], ls.stdout
    finally:
        assert superlink, "no local SuperLink of this FLWR_HOME found to stop"
        stop_pids([q for p in superlink for q in [*descendants(p), p]])
    assert not any(alive(p) for p in superlink)
    assert rows(run_dir) == local_rows


def ray_start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", *args, "--num-cpus", "1", "--object-store-memory",
                             str(100 * 1024**2), "--block"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def wait_nodes(address: str, n: int, timeout: float = 120.0) -> None:
    code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive'])); ray.shutdown()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise AssertionError(f"the test Ray cluster at {address} did not reach {n} nodes")


def test_slmfed_simulate_on_a_ray_cluster_it_did_not_start(cohort, local_rows, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="slmrt-", dir="/tmp")  # short: Ray's socket paths are length-limited
    # the cluster's processes get a bare environment: nothing the runner sets can reach its workers by inheritance
    bare = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "RAY_USAGE_STATS_ENABLED": "0"}
    procs = [ray_start(["--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                        "--temp-dir", temp_dir], tmp_path / "head.log", bare)]
    try:
        wait_nodes(address, 1)
        procs.append(ray_start(["--address", address, "--node-ip-address", "127.0.0.1"], tmp_path / "node2.log", bare))
        wait_nodes(address, 2)
        proc = simulate(cohort, tmp_path / "run-ray", "--ray-address", address)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert rows(tmp_path / "run-ray") == local_rows

        # data locality, checked before the study: a cache no node can read is named with the node
        missing = subprocess.run(
            [sys.executable, "-c", "import sys,json; from simulation.runner import run_study; "
             "run_study([{'cache-dir': sys.argv[1]}], {'run-dir': sys.argv[2]}, ray_address=sys.argv[3])",
             str(tmp_path / "no-such-cache"), str(tmp_path / "run-x"), address],
            capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert missing.returncode != 0
        assert f"cannot read {tmp_path / 'no-such-cache'}" in missing.stderr and "node " in missing.stderr
        assert not (tmp_path / "run-x").exists()
    finally:
        pids = [q for p in procs for q in [*descendants(p.pid), p.pid]]
        stop_pids(pids)
        for p in procs:
            p.wait(timeout=30)
    assert not any(alive(p) for p in pids), "processes of the test Ray cluster left running"
