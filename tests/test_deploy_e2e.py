"""deploy end to end on loopback: a real flower-superlink (TLS + SuperNode authentication) on the
internal address 127.0.0.1 behind the generated nginx front door on the public address 127.0.0.2,
real flower-supernodes (--isolation process) with the sites' app launchers started by `slmfed site
join` from `deploy init` bundles, sites registered and recorded by `deploy register-sites`; every
process is stopped by PID in the fixture teardown (deploy.loopback.stop_process)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import ssl
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deploy import pki
from deploy.launcher import NOT_APPROVED
from deploy.loopback import PUBLIC_HOST, LoopbackFederation, nginx_binary

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
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx; .ci/run installs it): "
                    "the coordinator's front door cannot be started")
    work = tmp_path_factory.mktemp("loopback")
    f = LoopbackFederation(work, SITES, privacy={"min-cell-size": 3})  # the tiny caches below need k = 3
    try:
        f.start_superlink()  # and the front door
        f.register_sites()   # what register-sites.sh runs: register + record node id -> site
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


def _flwr_as(fed, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("flwr")), *args], capture_output=True, text=True,
                          env=fed._env(home), timeout=120)


def _post(address: str, path: str, ca: Path) -> int:
    """A raw HTTPS POST (path sent as is, no normalisation) with only the CA certificate; the status."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=10) as sock, ctx.wrap_socket(sock, server_hostname=host) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/protobuf\r\n"
                  "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(200).decode("latin-1")
    return int(head.split()[1])


def test_attacker_with_the_ca_cannot_use_the_control_api(fed, tmp_path):
    """Everything a hospital receives (the CA certificate) does not open the Control API."""
    ca = fed.site_bundle(SITES[0]) / "ca.crt"
    home = tmp_path / "attacker"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n[superlink.x]\naddress = "{fed.address}"\n'
                                      f'root-certificates = "{ca}"\n')
    key = pki.make_site_key()
    (tmp_path / "attacker.pub").write_bytes(pki.ssh_public(key))
    for args in (["supernode", "register", str(tmp_path / "attacker.pub"), "x", "--name", "center-primary"],
                 ["supernode", "list", "x"]):
        res = _flwr_as(fed, home, *args)
        assert res.returncode != 0 and "403 Forbidden" in res.stdout + res.stderr, (args, res.stdout[-800:])
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/control/unregister-node",
                 "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/start-run", "/docs"):
        assert _post(fed.address, path, ca) in (400, 403), path
    # the SuperLink's own port does not answer on the public address at all
    with pytest.raises(OSError):
        socket.create_connection((PUBLIC_HOST, fed.internal_port), timeout=5).close()
    # the front door answered each Control API call itself (403); the SuperLink saw only the
    # coordinator's own registrations of the recorded sites
    door = [line for line in fed.log("front-door-access").splitlines() if "/v1/control/" in line]
    assert door and all('" 403 ' in line for line in door), door
    assert fed.log("superlink").count("POST /v1/control/register-node") == len(SITES)
    # the researcher on the coordinator (internal address) lists the nodes
    res = fed.flwr("supernode", "list", "slmfed", "--format", "json")
    assert res.returncode == 0 and res.stdout.count('"node-id"') >= len(SITES), res.stdout[-800:]


def test_unregistered_key_is_refused(fed, tmp_path):
    key = tmp_path / "stranger.key"
    pki.write_file(key, pki.ssh_private(pki.make_site_key()), private=True)
    tail = ["--root-certificates", str(fed.site_bundle(SITES[0]) / "ca.crt"), "--auth-supernode-private-key", str(key),
            "--max-retries", "1", "--max-wait-time", "10"]
    before = fed.log("front-door-access").count('/v1/fleet/')
    # through the front door: its key is no site key of the deployment, so nginx refuses every call (400)
    # before reading a body or opening a connection to the SuperLink
    assert _wait(fed.supernode("stranger", tail)) != 0
    door = fed.log("front-door-access").splitlines()
    fleet = [line for line in door if "/v1/fleet/" in line][before:]
    assert fleet and all('" 400 ' in line for line in fleet), fleet
    assert "No SuperNode found with the given public key" not in fed.log("superlink")
    # past the front door (on the coordinator itself): the SuperLink's node authentication refuses it
    assert _wait(fed.supernode("stranger-inside", tail, internal=True)) != 0
    assert "Failed to activate SuperNode" in fed.log("stranger-inside")
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
        f'[superlink]\ndefault = "bad"\n[superlink.bad]\naddress = "{fed.internal_address}"\ninsecure = true\n')
    res = _flwr_as(fed, home, "ls", "bad")
    assert res.returncode != 0 and "Connection to the SuperLink is unavailable" in res.stdout + res.stderr


def _extract(fab: bytes, where: Path) -> Path:
    """An app folder holding exactly the FAB's files: `flwr run` on it builds the same FAB (same hash)."""
    zipfile.ZipFile(io.BytesIO(fab)).extractall(where)
    shutil.rmtree(where / ".info")  # FAB metadata, rebuilt by `flwr run`
    return where


def test_paper_study_runs_across_two_sites(fed, tmp_path):
    missing = _missing_study_parts()
    if missing:
        pytest.skip(f"study apps not available yet: {', '.join(missing)}")
    sys.path.insert(0, str(REPO / "tests"))
    from flwr.cli.build import build_fab_from_disk

    from fedtools import make_cache  # the lead's prepared-cache double (same format as `slmfed prepare`)

    # each site approves the app it reviewed: the FAB `flwr run` builds from this repository
    fab = build_fab_from_disk(REPO)
    approved_app = _extract(fab, tmp_path / "approved")  # what the researcher runs, immune to edits meanwhile
    digest = hashlib.sha256(fab).hexdigest()
    for s in SITES:
        fed.approve(s, digest)
    caches = {"center-primary": tmp_path / "primary-cache", "center-external": tmp_path / "external-cache"}
    make_cache(caches["center-primary"], 24, 1, "center-primary")
    make_cache(caches["center-external"], 12, 2, "center-external")
    for s in SITES:
        fed.join(s, caches[s])
    # a key an admin registered by hand but never recorded as a site: it connects, and is never enrolled
    extra = tmp_path / "extra.key"
    k = pki.make_site_key()
    pki.write_file(extra, pki.ssh_private(k), private=True)
    (tmp_path / "extra.pub").write_bytes(pki.ssh_public(k))
    extra_node = fed.register_unrecorded(tmp_path / "extra.pub", "extra")
    # (it dials the SuperLink itself: the front door lets through only the deployment's site keys)
    fed.supernode("extra", ["--root-certificates", str(fed.site_bundle(SITES[0]) / "ca.crt"),
                            "--auth-supernode-private-key", str(extra), "--node-config",
                            f'site-name="center-primary" cache-dir="{caches["center-primary"]}"'], internal=True)
    fed.wait_connected(3)

    # 1. the same app with one line changed: refused at each site before any of its code runs
    changed = _extract(fab, tmp_path / "changed")
    (changed / "client" / "app.py").write_text((changed / "client" / "app.py").read_text()
                                               + "\nEXFILTRATE = True  # one changed line\n")
    res, _ = fed.run_study(changed,
                           {"scenario": "paper", "num-rounds": 1, "folds": 2, "models": "dl", "site-retries": 0,
                            "site-timeout-s": 120.0, "run-dir": str(tmp_path / "refused-run")}, timeout=300)
    # the ServerApp's log (kept by the SuperLink for the run, streamed to the researcher's `flwr run`):
    # each site's refusal arrived there as its error reply
    coordinator_log = res.stdout + res.stderr
    assert res.returncode != 0, coordinator_log[-3000:]  # `slmfed deploy run`: a study without results fails
    assert coordinator_log.count(f"error reply (code 4003): {NOT_APPROVED}") >= len(SITES), coordinator_log[-3000:]
    assert not (tmp_path / "refused-run" / "results.json").exists()
    for s in SITES:
        site_log = fed.log(f"site-{s}")
        assert f"{NOT_APPROVED}: app" in site_log and "EXFILTRATE" not in site_log

    # 2. the approved app runs
    run_dir = tmp_path / "run"
    res, seconds = fed.run_study(approved_app, {"scenario": "paper", "num-rounds": 1, "local-epochs": 1, "folds": 2,
                                        "models": "dl", "ensemble-size": 1, "run-dir": str(run_dir)}, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert (run_dir / "results.json").is_file(), f"no results.json after {seconds:.0f}s:\n{out[-3000:]}"
    assert " completed: " in out and " result row(s) in " in out, out[-1000:]  # counted by `slmfed deploy run`
    results = json.loads((run_dir / "results.json").read_text())
    text = json.dumps(results)
    assert {(r["model"], r["cohort"]) for r in results["rows"]} == {
        ("dl", "center-primary: 2-fold CV"), ("dl", "center-external: external validation")}
    # the registered-but-unrecorded node (claiming to be center-primary) was logged and never enrolled
    log = fed.log("superlink")
    assert f"node {extra_node} is connected but not a registered site" in out
    assert "Receiving:" not in fed.log("extra")  # it was never sent a message
    # nothing identifying left the sites: the raw patient ids are only in the sites' id maps
    assert "PID-" not in text and "PID-" not in log
