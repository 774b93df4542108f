"""`slmfed simulate` end to end on the real path (synth DICOM -> prepare -> Flower simulation on a
private local Ray), and the two other ways to run the same study: `flwr run .` (Flower's local
simulation federation) and `slmfed simulate --ray-address` (a Ray cluster this test starts, not the
runner), which must give the same results rows. The plain run is done once, shared by all three.
The Ray-cluster test takes about a minute more than the CI budget allows: it runs when
SLMFED_LONG_TESTS=1 (it passed here; simulation/README.md "On a Ray cluster").

Every process started here is stopped by PID: the local SuperLink that `flwr run` leaves behind, and the
two `ray start --block` processes (head + a second node standing in for another machine) with their
descendants. Nothing global (`ray stop`) is used: other people's Ray on this machine stays untouched.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulation.raycluster import LoopbackRayCluster, alive, descendants, free_port, stop_pids

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = {"scenario": "paper", "folds": 2, "num-rounds": 1, "local-epochs": 1, "models": "cf,dl,combined",
            "cf-l2": 0.5}
K = 3  # the small cohort's folds cannot hold k = 10 patients of each class

pytestmark = pytest.mark.slow


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


def _ray_pids() -> set[int]:
    """Running Ray processes. Zombies are not running: an exited worker waits in the process table
    until its parent (or PID 1, which in some containers never reaps) collects it, and pgrep -f
    still matches it by name."""
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    return {pid for pid in map(int, out.split()) if alive(pid)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "(exited)"


def _still_running(pids: set[int], within_s: float) -> dict[int, str]:
    """Poll these PIDs until each has exited or `within_s` passed; pid -> command line of those still alive."""
    deadline = time.monotonic() + within_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.25)
    return {p: _cmdline(p) for p in sorted(left)}


@pytest.fixture(scope="module")
def local_run(cohort):
    """`slmfed simulate` on this machine (private FLWR_HOME): the reference run, its output, and the Ray
    processes running before and after it."""
    out = cohort.parent / "run-local"
    before = _ray_pids()
    proc = simulate(cohort, out, env={**os.environ, "FLWR_HOME": str(cohort.parent / "flwr-home")})
    return out, proc, before, _ray_pids()


@pytest.fixture(scope="module")
def local_rows(local_run):
    out, proc, _, _ = local_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rows(out)


def test_simulate_paper_scenario_through_ray_leaves_nothing_running(cohort, local_run):
    run, proc, before, after = local_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "center-primary: 2-fold CV" in proc.stdout and "center-external: external validation" in proc.stdout
    assert "report:" in proc.stdout
    report = (run / "report.md").read_text()
    # what a site needs to use the final models (slmfed predict), and the report as one web page
    bundle = json.loads((run / "models" / "final.json").read_text())
    assert set(bundle["models"]) == {"cf", "dl", "combined"} and bundle["preprocessing"]["channels"] == ["t2", "dwi", "adc", "mask"]
    assert "data:image/png;base64," in (run / "report.html").read_text()
    assert "| center-primary | 3 |" in report and "| center-external | 3 |" in report  # the k each site used
    res = json.loads((run / "results.json").read_text())
    assert {(r["model"], r["site"]) for r in res["rows"]} == {
        (m, s) for m in ("cf", "dl", "combined") for s in ("center-primary", "center-external")}
    assert res["oracle"]["center-primary"]["combined"] > 0.85  # truth.json travelled into the report
    assert (cohort / "caches" / "center-primary" / "manifest.json").is_file()
    # Ray's own shutdown (workers, raylet, GCS) may still be finishing when `slmfed simulate` returns,
    # more so on a loaded machine: wait, bounded, for exactly the processes that appeared during the run
    left = _still_running(after - before, within_s=30.0)
    assert not left, "Ray processes left running 30 s after slmfed simulate exited:\n" + "\n".join(
        f"  pid {pid}: {cmd}" for pid, cmd in left.items())


def test_flwr_run_in_the_project_folder_gives_the_rows_of_slmfed_simulate(cohort, local_rows, tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    http, control = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "FLWR_LOCAL_CONTROL_API_PORT": str(control)}
    run_dir = tmp_path / "run-flwr"
    overrides = {**SETTINGS, "sim-data": str(cohort), "sim-min-cell-size": K, "run-dir": str(run_dir)}
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=600, env=env,
                              cwd=tmp_path)

    try:
        # flwr gives the local SuperLink it starts 15 s, too short on a loaded 2-core machine: start it with
        # `flwr ls` (the same managed start), trying again while it is not up yet
        for _ in range(3):
            ls = flwr("ls", "--format", "json")
            if ls.returncode == 0:
                break
        assert ls.returncode == 0, ls.stdout[-2000:] + ls.stderr[-2000:]
        proc = flwr("run", str(ROOT), "--run-config", run_config, "--stream")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # --stream shows the study's progress and its result table, as slmfed simulate prints them
        assert "cv fold 0 dl: round 1/1 done" in proc.stdout, proc.stdout[-3000:]
        assert "AUC (95% CI)" in proc.stdout and "center-external: external validation" in proc.stdout
        # `flwr run` exits 0 whatever became of the run: ask the SuperLink how it ended
        ls = flwr("ls", "--format", "json")
        runs = json.loads(ls.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], ls.stdout
    finally:
        superlink = [int(p) for p in subprocess.run(["pgrep", "-f", f"flower-superlink .*{home}"], capture_output=True,
                                                    text=True).stdout.split()]
        stop_pids([q for p in superlink for q in [*descendants(p), p]])
    assert superlink, "no local SuperLink of this FLWR_HOME found: flwr run should have left one"
    assert not any(alive(p) for p in superlink)
    assert rows(run_dir) == local_rows


@pytest.mark.skipif(os.environ.get("SLMFED_LONG_TESTS") != "1",
                    reason="about 2 min on 2 cores (a two-node Ray cluster + a study): set SLMFED_LONG_TESTS=1 to run it")
def test_slmfed_simulate_on_a_ray_cluster_it_did_not_start(cohort, local_rows, tmp_path):
    # a head and a second node standing in for another machine, each with a bare environment; each
    # site's actor gets as many CPUs (torch threads) as the local reference run, whose float reductions
    # it must reproduce bit for bit (1 thread vs 2 changes the DL model's last digits)
    with LoopbackRayCluster(nodes=2, cpus_per_node=2, log_dir=tmp_path) as cluster:
        proc = simulate(cohort, tmp_path / "run-ray", "--ray-address", cluster.address, "--client-cpus", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert rows(tmp_path / "run-ray") == local_rows

        # data locality, checked before the study: a cache no node can read is named with the node
        missing = subprocess.run(
            [sys.executable, "-c", "import sys; from simulation.runner import run_study; "
             "run_study([{'cache-dir': sys.argv[1]}], {'run-dir': sys.argv[2]}, ray_address=sys.argv[3])",
             str(tmp_path / "no-such-cache"), str(tmp_path / "run-x"), cluster.address],
            capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert missing.returncode != 0
        assert f"cannot read {tmp_path / 'no-such-cache'}" in missing.stderr and "node " in missing.stderr
        assert not (tmp_path / "run-x").exists()
    assert cluster.pids and not any(alive(p) for p in cluster.pids), "processes of the test Ray cluster left running"


def test_ctrl_c_stops_within_seconds_says_how_to_resume_and_the_resume_gives_the_same_rows(cohort, local_rows, tmp_path):
    out = tmp_path / "run-interrupted"
    flags = [x for k, v in SETTINGS.items() if k != "scenario" for x in (f"--{k}", str(v))]
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--data", str(cohort), *flags, "--min-cell-size", str(K)]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    before = _ray_pids()
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoint" / "state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the study ended before its first checkpoint: nothing was interrupted"
        during = _ray_pids()
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)  # without the handler it waits for a second Ctrl-C: forever
        stopped_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert f"continue it with:\n  slmfed simulate --resume {out}" in err and "Traceback" not in err
    assert not (out / "results.json").exists()
    left = _still_running(during - before, within_s=30.0)
    assert not left, f"Ray processes left running after Ctrl-C ({stopped_s:.1f} s to stop):\n{left}"
    # the same command again does not start over in (and overwrite) the interrupted run
    again = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and f"slmfed simulate --resume {out}" in again.stderr
    resumed = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--resume", str(out)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows(out) == local_rows
