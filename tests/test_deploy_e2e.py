"""deploy end to end on loopback, following the runbook of deploy/README.md word for word.

The coordinator's steps C1.1-C1.6 (module fixture), each hospital's steps H2.1-H2.6 and the researcher's
R3.1 (test_paper_study_runs_across_two_sites) are read from the runbook's bash blocks and run as written
by tests/runbook.py, on a fresh folder: two sites with the synthetic cohort `slmfed synth --preset
small` as their site folders (each with a site.toml, `crop-size = 40`, for CI time). Where one machine
cannot run a command as written, tests/runbook.py's docstring lists the mapping, all of it; in short:
- paths: /etc/slmfed -> the role's bundle as `deploy init` wrote it; /var/lib/slmfed, /var/log/slmfed ->
  the state / log folders given to the init line; a hospital's /srv/slmfed, /var/lib/slmfed(-app) ->
  hosts/<site>/...; /data/slm-site -> the synthetic cohort's site folder; /opt/slmfed/src -> the
  release the sites approve (this checkout's FAB, unpacked); ~/.flwr -> the researcher's FLWR_HOME;
  `center-primary` in the hospital steps -> each site in turn;
- added flags: C1.1 `deploy init` + front door on 127.0.0.2, free ports, state / logs in the work folder,
  this virtualenv, k = 3 (LoopbackFederation.init_options); R3.1 `deploy run` + a one-round, two-fold,
  DL-only `--run-config` without augmentation (CI time);
- replaced: useradd / chown skipped; cp of a bundle onto itself or into /etc/systemd/system/,
  /etc/nginx/conf.d/ skipped; rm of nginx's default site skipped; apt-get install nginx -> nginx must be
  installed; nginx -t -> nginx -t of the front door; systemctl enable --now flower-superlink -> the
  unit's ExecStart with its Environment; systemctl reload nginx -> nginx with the front door;
  systemctl enable --now flower-supernode slmfed-launcher -> `slmfed site join` (the runbook's
  alternative); `slmfed deploy status` ("watch ... come online") is re-run until it exits 0.
A runbook command with no mapping fails the test naming the step, the README line and the command.

Besides the runbook: a real flower-superlink (TLS + SuperNode authentication) on the internal address
127.0.0.1 behind the generated nginx front door on the public address 127.0.0.2, attacked from the
public address (the other tests), a changed app refused at both sites, a registered but unrecorded node
never enrolled. Every process is stopped by PID in the fixture teardown (deploy.loopback.stop_process)."""
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deploy import pki
from deploy.launcher import NOT_APPROVED
from deploy.loopback import PUBLIC_HOST, LoopbackFederation, nginx_binary, stop_process

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SITES = ["center-primary", "center-external"]
# R3.1 runs the paper scenario as the runbook writes it, shortened for CI time
SITE_TOML = "crop-size = 40\n"
STUDY_CONFIG = 'num-rounds=1 local-epochs=1 folds=2 models="dl" ensemble-size=1 augment=false'


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
    sys.path.insert(0, str(REPO / "tests"))
    from runbook import LoopbackRunbook

    work = tmp_path_factory.mktemp("loopback")
    # the small cohort's folds cannot hold k = 10 patients of each class: the init line gets k = 3
    f = LoopbackFederation(work, SITES, privacy={"min-cell-size": 3}, init=False)
    # the hospitals' site folders (read in H2.1): generated meanwhile, stopped by PID in teardown
    with (f.logs / "synth.log").open("wb") as log:
        f.synth = subprocess.Popen([str(Path(sys.executable).with_name("slmfed")), "synth", "--out", str(work / "cohort"),
                                    "--preset", "small", "--seed", "0", "--no-progress"], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    f.runbook = LoopbackRunbook(f, cohort=work / "cohort", release=work / "release", study_config=STUDY_CONFIG)
    book = f.runbook
    try:
        for step in [s for s in book.steps if s.startswith("C1.")]:
            book.run(step)
            if step == "C1.1":
                f.load()
        # what C1.1-C1.6 say to expect
        assert "wrote " in book.output("C1.1") and f"Runtime API port {f.supernode_port + 1}" in book.output("C1.1")
        assert "deployment: OK" in book.output("C1.2")
        assert "syntax is ok" in book.output("C1.4") and f"{f.out / 'coordinator'}: OK" in book.output("C1.4")
        assert "site center-primary: node" in book.output("C1.5") and "recorded in" in book.output("C1.5")
        status = book.output("C1.6")  # before any hospital joined
        assert "DOWN  site center-primary" in status and "DOWN  site center-external" in status, status
        assert not [l for l in status.splitlines() if l.startswith("DOWN") and " site " not in l], status
        yield f
    finally:
        if f.synth.poll() is None:  # still generating (a step failed early)
            stop_process(f.synth)
        f.stop()
    for name, proc in [*f.procs.items(), ("synth", f.synth)]:
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
    from flwr.cli.build import build_fab_from_disk

    book = fed.runbook
    # the release every site reviews and approves (H2.3: /opt/slmfed/src) and the researcher runs (R3.1, a
    # clean checkout): the FAB `flwr run` builds from this repository, unpacked (immune to edits meanwhile)
    fab = build_fab_from_disk(REPO)
    _extract(fab, book.release)
    digest = hashlib.sha256(fab).hexdigest()
    assert fed.synth.wait(timeout=600) == 0, fed.log("synth")[-3000:]
    for s in SITES:  # each hospital's site.toml (client/README.md): the 40-pixel crop keeps CI time down
        (fed.work / "cohort" / s / "site.toml").write_text(SITE_TOML)
    # each hospital follows H2 (H2.1 prepares its cache from its site folder); two hospitals, at the same time

    def hospital(s: str) -> None:
        for step in [k for k in book.steps if k.startswith("H2.")]:
            done = book.run(step, s)
            if any(r.command.startswith("slmfed deploy status") for r in done):
                book.watch(step, s)  # "watch it connect"

    with ThreadPoolExecutor(len(SITES)) as pool:
        for done in [pool.submit(hospital, s) for s in SITES]:
            done.result()  # a failed step fails here, naming the step
    assert book.output("H2.3").count(f"approved app {digest}") == len(SITES)
    for s in SITES:
        assert f"{fed.site_bundle(s)}: OK" in book.output("H2.5") and "flower-supernode" in book.output("H2.5")
    caches = {s: book.cache(s) for s in SITES}
    book.watch("C1.6")  # the coordinator's "watch the sites come online": every site ok
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

    # 1. (not in the runbook: a compromised coordinator) the same app with one line changed: refused at each site before any of its code runs
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

    # 2. the researcher runs the approved app as R3.1 says (`slmfed deploy run`: exit 0 only with results)
    book.run("R3.1")
    out = book.output("R3.1")
    run_dir = fed.state_dir / "runs" / "hospitals-2025"  # the runbook's run-dir
    assert (run_dir / "results.json").is_file(), out[-3000:]
    assert " completed: " in out and " result row(s) in " in out, out[-1000:]  # counted by `slmfed deploy run`
    results = json.loads((run_dir / "results.json").read_text())
    text = json.dumps(results)
    assert {(r["model"], r["cohort"]) for r in results["rows"]} == {
        ("dl", "center-primary: 2-fold CV"), ("dl", "center-external: external validation")}
    # the registered-but-unrecorded node (claiming to be center-primary) was logged and never enrolled
    log = fed.log("superlink")
    assert f"node {extra_node} is connected but not a registered site" in out
    assert "Receiving:" not in fed.log("extra")  # it was never sent a message
    # nothing identifying left the sites: the raw patient ids (clinical.csv) are only in the sites' id maps
    ids = [line.split(",", 1)[0] for s in SITES
           for line in (fed.work / "cohort" / s / "clinical.csv").read_text().splitlines()[1:]]
    assert len(ids) == 40 and not [i for i in ids if i in text or i in log]
