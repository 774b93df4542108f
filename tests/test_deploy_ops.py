"""deploy, operator side (issue 28): init's ports and k, site-only `deploy check` misses, the front door's
limits as generated, approvals that survive a bundle update, `site sync-policy`, `deploy run`'s exit
status and `deploy status` (no Flower process; `flwr` is a stand-in script)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from common.cli import main as cli_main
from deploy import bundle as B
from deploy import pki
from deploy.check import check_deployment
from deploy.init import DeployPlan, init_deployment
from tests.test_deploy import _edit, _problems, _toml_edit


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ops") / "out"
    init_deployment(DeployPlan(out=out, superlink_hosts=["slm.example.org"], sites=["a", "b"]))
    return out


@pytest.fixture
def dep(generated, tmp_path) -> Path:
    out = tmp_path / "dep"
    shutil.copytree(generated, out)
    return out


def _errors(findings):
    return [f for f in findings if not f.warning]


# ---------------------------------------------------------------- init: ports, k

def test_init_ports_reach_every_file_and_sites_never_share_a_runtime_port(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["deploy", "init", "--out", str(out), "--superlink-host", "door.example.org", "--sites", "a,b,c",
                     "--port", "8443", "--internal-port", "9200", "--supernode-port", "9300",
                     "--min-cell-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "front door at door.example.org:8443" in printed and "SuperLink on 127.0.0.1:9200" in printed
    coord = out / "coordinator"
    assert "--port 9200" in (coord / "flower-superlink.service").read_text()
    assert '"127.0.0.1:9200:9200"' in (coord / "compose.yaml").read_text()
    assert "proxy_pass https://127.0.0.1:9200;" in (coord / B.FRONT_DOOR).read_text()
    assert "listen 0.0.0.0:8443 ssl;" in (coord / B.FRONT_DOOR).read_text()
    assert "proxy_pass https://slmfed-superlink:9200;" in (coord / B.FRONT_DOOR_COMPOSE).read_text()
    assert 'address = "127.0.0.1:9200"' in (coord / "flwr-config.toml").read_text()
    ports = []
    for site in "abc":
        sdir = out / "sites" / site
        doc = tomllib.loads((sdir / B.BUNDLE_FILE).read_text())
        ports.append(doc["node"]["port"])
        assert doc["superlink"]["address"] == "door.example.org:8443"
        assert doc["privacy"]["min-cell-size"] == 5  # k written once, by init
        for f in ("flower-supernode.service", "compose.yaml"):
            assert "min-cell-size=5" in (sdir / f).read_text(), f
        assert f"127.0.0.1:{doc['node']['port']}" in (sdir / B.LAUNCHER_UNIT).read_text()
    assert ports == [9300, 9301, 9302]
    findings = check_deployment(out)
    assert _errors(findings) == [], _problems(findings)
    # k = 5 passes, with a warning that says what it allows, on every site
    warned = [f for f in findings if f.warning and "min-cell-size = 5 is below the study default 10" in f.problem]
    assert {Path(f.path).parent.name for f in warned} == {"a", "b", "c"}
    assert "as few as 5 patients of a class" in warned[0].problem
    assert cli_main(["deploy", "check", str(out / "sites" / "a")]) == 0
    assert "warning: [privacy] min-cell-size = 5" in capsys.readouterr().out


def test_init_refuses_a_runtime_port_range_over_the_superlink(tmp_path):
    with pytest.raises(ValueError, match="include the SuperLink's internal port 9095"):
        DeployPlan(out=tmp_path, superlink_hosts=["h"], sites=["a", "b"], internal_port=9095).validate()


def test_site_sync_policy_rewrites_the_supernode_commands_from_bundle_toml(dep, capsys):
    site = dep / "sites" / "a"
    _toml_edit(site / B.BUNDLE_FILE, lambda d: d["privacy"].update({"min-cell-size": 4, "share-histograms": False}))
    before = _errors(check_deployment(site))
    assert any("differs from the site's privacy policy" in f.problem for f in before), _problems(before)
    assert cli_main(["site", "sync-policy", "--bundle", str(site)]) == 0
    assert "rewrote the SuperNode command" in capsys.readouterr().out
    after = check_deployment(dep)
    assert _errors(after) == [], _problems(after)
    for f in ("flower-supernode.service", "compose.yaml"):
        text = (site / f).read_text()
        assert "min-cell-size=4" in text and "share-histograms=false" in text, f
    assert (site / "compose.yaml").read_text().count("flower-supernode") >= 1
    assert cli_main(["site", "sync-policy", "--bundle", str(site)]) == 0  # idempotent
    assert "already match" in capsys.readouterr().out


def test_approvals_survive_copying_a_new_bundle_over_the_installed_one(dep, tmp_path):
    from deploy.launcher import approve

    installed = tmp_path / "etc-slmfed"
    shutil.copytree(dep / "sites" / "a", installed)  # sudo cp -r center-primary/. /etc/slmfed/
    digest = approve(installed / B.APPROVED_APPS, "ab" * 32, "reviewed")
    shutil.copytree(dep / "sites" / "a", installed, dirs_exist_ok=True)  # the coordinator's updated bundle
    assert B.read_approved_apps(installed / B.APPROVED_APPS) == {digest: "reviewed"}
    assert not (dep / "sites" / "a" / B.APPROVED_APPS).exists()
    assert _errors(check_deployment(installed)) == []
    # compose created a folder where the allow-list was missing: named, not silently "nothing approved"
    (installed / B.APPROVED_APPS).unlink()
    (installed / B.APPROVED_APPS).mkdir()
    assert any("is a folder, not the allow-list" in f.problem for f in check_deployment(installed))


# ---------------------------------------------------------------- site-only checks (issue 28)

def _v_system_ca_store(d):
    _edit(d / "sites/a/flower-supernode.service", "--root-certificates /etc/slmfed/ca.crt",
          "--root-certificates /etc/ssl/certs/ca-certificates.crt")


def _v_foreign_ca_consistent(d):
    ca = pki.make_ca()
    (d / "sites/a/ca.crt").write_bytes(pki.cert_pem(ca.cert))


def _v_two_cas(d):
    (d / "sites/a/ca.crt").write_bytes((d / "sites/a/ca.crt").read_bytes() + pki.cert_pem(pki.make_ca().cert))


def _v_host_changed_everywhere(d):
    for f in ("bundle.toml", "flower-supernode.service", "compose.yaml"):
        _edit(d / "sites/a" / f, "slm.example.org:9092", "evil.example.net:9092")


def _v_superlink_cert_missing(d):
    (d / "sites/a/superlink.crt").unlink()


def _v_pin_removed(d):
    _toml_edit(d / "sites/a/bundle.toml", lambda t: t["superlink"].pop("ca-sha256"))


def _v_launcher_umask(d):
    _edit(d / "sites/a/slmfed-launcher.service", "UMask=0077", "UMask=0022")


def _v_supernode_umask_unset(d):
    _edit(d / "sites/a/flower-supernode.service", "UMask=0077\n", "")


SITE_ONLY = {
    "SuperNode trusts the system CA store": (_v_system_ca_store, "sites/a/flower-supernode.service",
                                             "is not the bundle's ca.crt"),
    "foreign CA (ca.crt replaced)": (_v_foreign_ca_consistent, "sites/a/ca.crt", "is not the deployment CA pinned"),
    "ca.crt holds a second CA": (_v_two_cas, "sites/a/ca.crt", "holds 2 certificates"),
    "SuperLink host changed consistently": (_v_host_changed_everywhere, "sites/a/bundle.toml",
                                            "'evil.example.net' is not in the SuperLink certificate"),
    "SuperLink certificate missing": (_v_superlink_cert_missing, "sites/a", "superlink.crt (the SuperLink's certificate) is missing"),
    "CA not pinned": (_v_pin_removed, "sites/a/bundle.toml", "[superlink] ca-sha256 is missing"),
    "launcher UMask=0022": (_v_launcher_umask, "sites/a/slmfed-launcher.service", "UMask=0022"),
    "SuperNode UMask unset": (_v_supernode_umask_unset, "sites/a/flower-supernode.service", "UMask=unset"),
}


@pytest.mark.parametrize("name", list(SITE_ONLY))
def test_site_bundle_alone_catches_a_site_admins_mistake(dep, name):
    breaker, where, problem = SITE_ONLY[name]
    site = dep / "sites" / "a"
    assert check_deployment(site) == []
    breaker(dep)
    findings = _errors(check_deployment(site))
    assert any(f.path.endswith(where) and problem in f.problem for f in findings), \
        f"expected '{where}: ...{problem}...', got:\n{_problems(findings)}"


def test_k_three_is_a_warning_not_silence(dep, capsys):
    _toml_edit(dep / "sites/a/bundle.toml", lambda d: d["privacy"].update({"min-cell-size": 3}))
    from deploy.sync import sync_site

    sync_site(dep / "sites/a")
    findings = check_deployment(dep / "sites/a")
    assert _errors(findings) == [], _problems(findings)
    (w,) = [f for f in findings if f.warning]
    assert "min-cell-size = 3 is below the study default 10" in w.problem and "as few as 3" in w.problem
    assert cli_main(["deploy", "check", str(dep / "sites/a")]) == 0


# ---------------------------------------------------------------- coordinator: SuperLink, front door

def _v_superlink_process_no_secret(d):
    _edit(d / "coordinator/flower-superlink.service", "--enable-supernode-auth", "--enable-supernode-auth \\\n    --isolation process")


def _v_door_body_512m(d):
    _edit(d / "coordinator/nginx-slmfed.conf", f"client_max_body_size {B.FLEET_MAX_BODY_BYTES};", "client_max_body_size 512m;")


def _v_door_streams(d):
    _edit(d / "coordinator/nginx-slmfed.conf", "proxy_request_buffering on;", "proxy_request_buffering off;")


def _v_door_no_gate(d):
    _edit(d / "coordinator/nginx-slmfed-compose.conf", "            return 400;\n", "            set $x 1;\n")


def _v_door_no_conn_limit(d):
    _edit(d / "coordinator/nginx-slmfed.conf", f"limit_conn slmfed_conn {B.FRONT_DOOR_CONN_PER_IP};", "")


def _v_door_logs_headers(d):
    _edit(d / "coordinator/nginx-slmfed.conf", "$request_time'", "$request_time $http_flwr_signature'")


def _v_door_site_key_missing(d):
    text = (d / "coordinator/nginx-slmfed.conf").read_text()
    (d / "coordinator/nginx-slmfed.conf").write_text("\n".join(l for l in text.splitlines() if not l.endswith("# b")))


def _v_door_foreign_key(d):
    extra = pki.flower_public_key_b64(pki.make_site_key().public_key())
    _edit(d / "coordinator/nginx-slmfed.conf", "    default 0;\n", f'    default 0;\n    "{extra}" 1;\n')


COORDINATOR = {
    "SuperLink --isolation process without a secret": (_v_superlink_process_no_secret,
                                                       "coordinator/flower-superlink.service",
                                                       "--isolation process without --superexec-auth-secret-file"),
    "front door body cap 512m": (_v_door_body_512m, "coordinator/nginx-slmfed.conf", "client_max_body_size 512m"),
    "front door streams bodies": (_v_door_streams, "coordinator/nginx-slmfed.conf", "proxy_request_buffering off"),
    "front door forwards unsigned calls": (_v_door_no_gate, "coordinator/nginx-slmfed-compose.conf",
                                           "without the SuperNode authentication headers"),
    "front door without limit_conn": (_v_door_no_conn_limit, "coordinator/nginx-slmfed.conf", "limit_conn is missing"),
    "front door logs the signed headers": (_v_door_logs_headers, "coordinator/nginx-slmfed.conf",
                                           "log_format logs $http_flwr_signature"),
    "front door misses a site key": (_v_door_site_key_missing, "coordinator/nginx-slmfed.conf",
                                     "does not list site 'b'"),
    "front door lets a foreign key through": (_v_door_foreign_key, "coordinator/nginx-slmfed.conf",
                                              "lets through a public key that is no site-keys"),
}


@pytest.mark.parametrize("name", list(COORDINATOR))
def test_check_flags_each_coordinator_variant(dep, name):
    breaker, where, problem = COORDINATOR[name]
    assert check_deployment(dep / "coordinator") == []
    breaker(dep)
    findings = _errors(check_deployment(dep))
    assert any(f.path.endswith(where) and problem in f.problem for f in findings), \
        f"expected '{where}: ...{problem}...', got:\n{_problems(findings)}"


def test_front_door_body_cap_is_one_flower_chunk_plus_margin(generated):
    from flwr.common import constant

    assert B.FLEET_CHUNK_BYTES == int(os.environ.get("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", constant.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE))
    door = (generated / "coordinator" / B.FRONT_DOOR).read_text()
    assert f"client_max_body_size {B.FLEET_MAX_BODY_BYTES};" in door and B.FLEET_MAX_BODY_BYTES < 8 * 1024 * 1024
    for site in ("a", "b"):
        pub = pki.load_ssh_public(generated / "sites" / site / B.SITE_PUB)
        assert f'"{pki.flower_public_key_b64(pub)}" 1;  # {site}' in door


def test_installed_coordinator_flags_the_nginx_default_site(dep, tmp_path):
    out = tmp_path / "installed"
    coord = out / "coordinator"  # checked where it is installed: its install-dir is this folder
    init_deployment(DeployPlan(out=out, superlink_hosts=["slm.example.org"], sites=["a"], install_dir=str(coord)))
    nginx = tmp_path / "etc-nginx"
    (nginx / "sites-enabled").mkdir(parents=True)
    assert check_deployment(coord, nginx_dir=nginx) == []
    (nginx / "sites-enabled" / "default").write_text("server {\n    listen 80 default_server;\n    root /var/www/html;\n}\n")
    findings = check_deployment(coord, nginx_dir=nginx)
    assert any(f.path.endswith("sites-enabled/default") and "listen 80 default_server" in f.problem
               and "remove it" in f.problem for f in findings), _problems(findings)
    # a bundle before it is installed: the host's nginx is not this deployment's
    assert check_deployment(dep / "coordinator", nginx_dir=nginx) == []


# ---------------------------------------------------------------- deploy run / deploy status

FAKE_FLWR = r'''#!{python}
import json, os, sys
args = sys.argv[1:]
state = json.load(open(os.environ["FAKE_FLWR_STATE"]))
if args[0] == "run":
    print("Loading project configuration...")
    print("Successfully started run 4711")
    print(state.get("log", "INFO: study finished"))
    sys.exit(state.get("run_exit", 0))
if args[0] == "ls":
    print(json.dumps({{"success": True, "runs": [{{"run-id": "4711", "status": state["status"],
                      "status-details": state.get("details", ""), "elapsed": "00:00:07"}}]}}))
    sys.exit(0)
if args[:2] == ["supernode", "list"]:
    print(json.dumps({{"success": True, "nodes": [{{"node-id": str(n), "status": s}} for n, s in state["nodes"]]}}))
    sys.exit(0)
sys.exit(3)
'''


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    script = tmp_path / "flwr"
    script.write_text(FAKE_FLWR.format(python=sys.executable))
    script.chmod(0o755)
    state = tmp_path / "state.json"
    monkeypatch.setenv("FAKE_FLWR_STATE", str(state))

    def set_state(**kw):
        state.write_text(json.dumps(kw))
    return script, set_state


def _results(run_dir: Path, rows: list) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({"rows": rows}))


@pytest.mark.parametrize("case, code, message", [
    ("serverapp raised", 1, "run 4711 ended as finished:failed (ServerApp raised: ValueError)"),
    ("zero rows", 1, "completed with 0 result rows"),
    ("no results.json", 1, "does not exist: the study wrote no results"),
    ("flwr run failed", 1, "flwr run failed (exit 2)"),
    ("run folder elsewhere", 2, "is not on this machine"),
    ("results", 0, "completed: 2 result row(s)"),
])
def test_deploy_run_exit_status_says_how_the_study_ended(fake_flwr, tmp_path, case, code, message, capsys):
    from deploy.study import run_study

    script, set_state = fake_flwr
    run_dir = tmp_path / "run"
    status = "finished:failed" if case == "serverapp raised" else "finished:completed"
    set_state(status=status, details="ServerApp raised: ValueError" if case == "serverapp raised" else "",
              run_exit=2 if case == "flwr run failed" else 0)
    if case == "zero rows":
        _results(run_dir, [])
    elif case == "results":
        _results(run_dir, [{"model": "dl"}, {"model": "cf"}])
    elif case == "no results.json":
        run_dir.mkdir()
    where = tmp_path / "elsewhere" if case == "run folder elsewhere" else run_dir
    outcome = run_study(".", "slmfed", [f'run-dir="{where}" scenario="paper"'], flwr=str(script))
    assert outcome.code == code and message in outcome.message, outcome
    assert "Successfully started run 4711" in capsys.readouterr().out  # the stream is passed through


def test_deploy_status_names_sites_online_and_the_last_run(fake_flwr, generated, tmp_path):
    from deploy.registry import write_registry
    from deploy.status import status

    script, set_state = fake_flwr
    registry = tmp_path / "site-registry.toml"
    write_registry(registry, {"a": (11, "pub-a"), "b": (12, "pub-b")})
    set_state(status="finished:failed", details="ServerApp raised", nodes=[[11, "online"], [12, "offline"], [99, "online"]])
    lines, code = status(str(generated / "coordinator"), registry=str(registry), flwr=str(script))
    text = "\n".join(lines)
    assert code == 1
    assert "ok    site a: node 11 online" in text and "DOWN  site b: node 12 offline" in text
    assert "node 99 (online) is registered but no recorded site" in text
    assert "DOWN  last run 4711: finished:failed (ServerApp raised)" in text
    assert "SuperLink on 127.0.0.1:9093" in text
    site_lines, site_code = status(str(generated / "sites" / "a"))
    site_text = "\n".join(site_lines)
    assert site_code == 1 and "no approved app, every study is refused" in site_text
    assert "SuperNode Runtime API on 127.0.0.1:9094" in site_text and "k (min-cell-size) = 10" in site_text


# ---------------------------------------------------------------- the runbook against what init writes

def test_runbook_commands_match_what_init_generates(tmp_path, capsys):
    """The runbook's `deploy init` line, run as written (into tmp), writes every file its later steps copy
    or name under /etc/slmfed, passes `deploy check`, and prints what step C1.1 says to expect."""
    import re
    import shlex

    text = (Path(__file__).resolve().parents[1] / "deploy" / "README.md").read_text()
    runbook = text.split("## Runbook", 1)[1].split("\n## ", 1)[0]
    init = re.search(r"(slmfed deploy init .*?)\n   ```", runbook, re.S).group(1)
    argv = shlex.split(init.replace("\\\n", " "))[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "deployment")
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Runtime API port 9094" in printed and "Runtime API port 9095" in printed and "SHA-256" in printed
    out = tmp_path / "deployment"
    assert _errors(check_deployment(out)) == []
    shipped = {p.name for p in (out / "coordinator").iterdir()} | {p.name for p in (out / "sites").glob("*/*")}
    written_at_the_site = {B.APPROVED_APPS}  # `slmfed site approve` writes it (runbook H2.3)
    named = set(re.findall(r"/etc/slmfed/([A-Za-z0-9._-]+)", runbook)) - written_at_the_site
    assert named and named <= shipped, sorted(named - shipped)
    # the ports and names the runbook says to expect are the generated ones
    coord = tomllib.loads((out / "coordinator" / B.BUNDLE_FILE).read_text())["superlink"]
    assert f"127.0.0.1:{coord['internal-port']}" in runbook and f"on {coord['port']}" in runbook
    sites = tomllib.loads((out / "coordinator" / B.BUNDLE_FILE).read_text())["sites"]["names"]
    assert all(f"sites/{s}" in runbook or s in runbook for s in sites)
    assert "slmfed deploy run" in runbook and "sudo rm -f /etc/nginx/sites-enabled/default" in runbook


def test_runbook_steps_are_read_with_their_commands():
    """tests/runbook.py reads the runbook's bash blocks per step (what tests/test_deploy_e2e.py runs): every
    step that tells someone to type something has its commands, each of a program the loopback mapping
    knows; the `# for reference` block of R3.1 is not among them."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runbook import MAPPED_PROGRAMS, _strip_sudo, runbook_steps, split_commands

    steps = runbook_steps()
    typed = {sid for sid, st in steps.items() if st.commands}
    assert {"C1.1", "C1.2", "C1.4", "C1.5", "C1.6", "H2.1", "H2.2", "H2.3", "H2.5", "H2.6", "R3.1"} <= typed, typed
    programs = {_strip_sudo(argv)[0] for st in steps.values() for _, line in st.commands for argv in split_commands(line)}
    assert programs <= MAPPED_PROGRAMS, sorted(programs - MAPPED_PROGRAMS)
    r3 = [line for _, line in steps["R3.1"].commands]
    assert len(r3) == 1 and r3[0].strip().startswith("slmfed deploy run"), r3
    assert steps["H2.1"].commands[0][1].split()[:2] == ["slmfed", "prepare"]


def test_bench_deploy_reads_the_fleet_calls_from_the_front_doors_access_log(tmp_path):
    """`slmfed bench deploy` prints the deployed study's Fleet calls per endpoint from the front door's
    access log (format slmfed_door of deploy/templates/nginx-front-door.conf: request time last)."""
    from simulation.bench_deploy import fleet_calls

    template = (Path(__file__).resolve().parents[1] / "deploy/templates/nginx-front-door.conf").read_text()
    assert "$$request_time';" in template  # the field fleet_calls sums is the format's last
    log = tmp_path / "access.log"
    log.write_text('127.0.0.1 [04/Dec/2026:19:53:08 +0000] "POST /v1/fleet/pull-object HTTP/1.1" 200 0 850 0.015\n'
                   '127.0.0.1 [04/Dec/2026:19:53:08 +0000] "POST /v1/fleet/pull-object HTTP/1.1" 200 9 850 0.025\n'
                   '127.0.0.1 [04/Dec/2026:19:53:09 +0000] "POST /v1/fleet/push-messages HTTP/1.1" 200 0 900 0.100\n'
                   'a line nginx did not write\n')
    calls = fleet_calls(log)
    assert set(calls) == {"pull-object", "push-messages"}
    assert calls["pull-object"][0] == 2 and calls["pull-object"][1] == pytest.approx(0.04)
    assert calls["push-messages"] == (1, pytest.approx(0.1))
