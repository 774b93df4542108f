"""deploy end to end on loopback: a real flower-superlink (TLS + SuperNode authentication) and real
flower-supernodes started by `slmfed site join` from `deploy init` bundles; every process is
stopped by PID in the fixture teardown (deploy.loopback.stop_process)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import pki
from deploy.loopback import LoopbackFederation

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SITES = ["center-primary", "center-external"]


def _missing_study_parts() -> list[str]:
    missing = []
    for mod in ("server.app", "client.app"):
        try:
            __import__(mod)
        except ImportError as exc:
            missing.append(f"{mod} ({exc})")
    return missing


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    work = tmp_path_factory.mktemp("loopback")
    f = LoopbackFederation(work, SITES, privacy={"min-cell-size": 3})  # the tiny caches below need k = 3
    try:
        f.start_superlink()
        for s in SITES:
            f.register(s)
        yield f
    finally:
        f.stop()
    for name, proc in f.procs.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running after teardown"


def _wait(proc: subprocess.Popen, timeout: float = 60) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {proc.args[:2]} did not give up within {timeout}s")


def test_unregistered_key_is_refused(fed, tmp_path):
    key = tmp_path / "stranger.key"
    pki.write_file(key, pki.ssh_private(pki.make_site_key()), private=True)
    proc = fed.supernode("stranger", ["--root-certificates", str(fed.site_bundle(SITES[0]) / "ca.crt"),
                                      "--auth-supernode-private-key", str(key), "--max-retries", "1",
                                      "--max-wait-time", "10"])
    assert _wait(proc) != 0
    assert "Failed to activate SuperNode" in fed.log("stranger")
    assert "No SuperNode found with the given public key" in fed.log("superlink")


def test_supernode_without_the_ca_cannot_connect(fed):
    proc = fed.supernode("no-ca", ["--auth-supernode-private-key", str(fed.site_bundle(SITES[0]) / "supernode.key"),
                                   "--max-retries", "1", "--max-wait-time", "10"])
    assert _wait(proc) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in fed.log("no-ca")


def test_insecure_client_fails_clearly(fed, tmp_path):
    proc = fed.supernode("insecure", ["--insecure", "--max-retries", "1", "--max-wait-time", "10"])
    assert _wait(proc) != 0
    assert "could not establish a connection to the SuperLink" in fed.log("insecure")
    # the researcher side: an `insecure = true` connection is refused as well
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bad"\n[superlink.bad]\naddress = "{fed.address}"\ninsecure = true\n')
    res = subprocess.run([str(Path(sys.executable).with_name("flwr")), "ls", "bad"], capture_output=True,
                         text=True, env={**fed._env(home)}, timeout=60)
    assert res.returncode != 0 and "Connection to the SuperLink is unavailable" in res.stdout + res.stderr


def test_paper_study_runs_across_two_sites(fed, tmp_path):
    missing = _missing_study_parts()
    if missing:
        pytest.skip(f"study apps not available yet: {', '.join(missing)}")
    sys.path.insert(0, str(REPO / "tests"))
    from fedtools import make_cache  # the lead's prepared-cache double (same format as `slmfed prepare`)

    caches = {"center-primary": tmp_path / "primary-cache", "center-external": tmp_path / "external-cache"}
    make_cache(caches["center-primary"], 24, 1, "center-primary")
    make_cache(caches["center-external"], 12, 2, "center-external")
    for s in SITES:
        fed.join(s, caches[s])
    fed.wait_connected(2)
    run_dir = tmp_path / "run"
    res, seconds = fed.run_study(REPO, {"scenario": "paper", "num-rounds": 1, "local-epochs": 1, "folds": 2,
                                        "models": "dl", "run-dir": str(run_dir)}, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert (run_dir / "results.json").is_file(), f"no results.json after {seconds:.0f}s:\n{out[-3000:]}"
    results = json.loads((run_dir / "results.json").read_text())
    text = json.dumps(results)
    assert {(r["model"], r["cohort"]) for r in results["rows"]} == {
        ("dl", "center-primary: 2-fold CV"), ("dl", "center-external: external validation")}
    # nothing identifying left the sites: the raw patient ids are only in the sites' id maps
    assert "PID-" not in text and "PID-" not in fed.log("superlink")
