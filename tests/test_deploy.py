"""deploy: PKI, generated configs, `deploy check` findings, `site join` checks (no Flower processes)."""
from __future__ import annotations

import datetime as dt
import shlex
import socket
import ssl
import stat
import threading
import tomllib
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from deploy import bundle as B
from deploy import pki
from common.config import SITE_POLICY_KEYS, load_config
from deploy.check import Finding, check_deployment, collect_commands
from common.cli import main as deploy_main
from deploy.init import DeployPlan, init_deployment
from deploy.join import JoinError, join_command, preflight_tls


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "out"
    init_deployment(DeployPlan(out=out, superlink_hosts=["slm.example.org", "10.0.0.5"], sites=["a", "b"]))
    return out


@pytest.fixture
def dep(generated, tmp_path) -> Path:
    """A private copy of the generated deployment that a test may break."""
    import shutil

    out = tmp_path / "dep"
    shutil.copytree(generated, out)  # copy2 keeps the 0600 modes
    return out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _problems(findings: list[Finding]) -> str:
    return "\n".join(map(str, findings))


# ---------------------------------------------------------------- init / PKI

def test_init_writes_private_keys_0600_and_bundles(generated):
    for key in ["ca/ca.key", "coordinator/certs/server.key", "sites/a/supernode.key", "sites/b/supernode.key",
                "sites/a/superexec.secret", "sites/a/study-signing.key", "sites/b/study-signing.key"]:
        assert _mode(generated / key) == 0o600, key
    site = generated / "sites" / "a"
    assert {p.name for p in site.iterdir()} == {
        "bundle.toml", "ca.crt", "supernode.key", "supernode.pub", "flower-supernode.service", "compose.yaml",
        "superexec.secret", "superlink.crt", "slmfed-launcher.service", "study-signing.key", "peer-roster.toml"}
    # no allow-list in the bundle: nothing runs until the site approves an app, and copying a new bundle
    # over an installed one never resets the site's approvals
    # the site bundle carries no coordinator secret and no other site's key
    assert not any("server" in p.name or p.name == "ca.key" for p in site.rglob("*"))
    assert sorted(p.name for p in (generated / "coordinator" / "site-keys").iterdir()) == ["a.pub", "b.pub"]


def test_privacy_policy_and_dp_choice_belong_to_each_site(generated):
    coord = tomllib.loads((generated / "coordinator/bundle.toml").read_text())
    assert "privacy" not in coord and "dp" not in coord  # the coordinator cannot set the sites' policy or DP
    for site in ("a", "b"):
        privacy = tomllib.loads((generated / f"sites/{site}/bundle.toml").read_text())["privacy"]
        assert privacy == {"min-cell-size": 10, "histogram-bins": 100, "share-histograms": True,
                           "max-logit-slope": 10.0, "max-partitions": 24, "max-studies": 50,
                           "dp-epsilon": 0.0, "dp-delta": 1e-5, "dp-clip-norm": 1.0,  # DP stated explicitly: off
                           "dp-lifetime-epsilon": 10.0, "span-audit": "enforce", "model-verification": "enforce",
                           # compute caps: what a coordinator may make this site train, run and send
                           "allowed-backbones": "resnet10,resnet18", "max-widen-factor": 1.0,
                           "max-ensemble-size": 5, "max-epoch-patients": 5000, "max-reply-mb": 200,
                           "max-rounds": 50, "min-batch-size": 0, "max-fits-per-study": 64,
                           "max-evaluations-per-study": 2000, "max-evaluations": 50000}
        assert set(privacy) == set(SITE_POLICY_KEYS) - {"privacy-ledger"}  # ledger: STUDY_DIR default


def test_node_config_carries_the_site_policy_and_a_writable_study_dir(generated):
    site = generated / "sites/a"
    bundle = tomllib.loads((site / "bundle.toml").read_text())
    unit_text = (site / "flower-supernode.service").read_text()
    (unit,) = collect_commands(site / "flower-supernode.service", unit_text)
    launcher_text = (site / "slmfed-launcher.service").read_text()
    (launcher,) = collect_commands(site / "slmfed-launcher.service", launcher_text)
    comp, comp_launcher = collect_commands(site / "compose.yaml", (site / "compose.yaml").read_text())
    for cmd, sandbox in ((unit, launcher), (comp, comp_launcher)):
        node = B.parse_node_config(cmd.flag("--node-config"))
        # what the ClientApp reads: load_config(node_config=...) gives exactly the bundle's policy
        cfg = load_config(node_config=node)
        assert {k: cfg[k] for k in bundle["privacy"]} == bundle["privacy"]
        assert node["study-dir"] == bundle["node"]["study-dir"] == "/srv/slmfed/study"
        # the ClientApp runs in the launcher's sandbox (--isolation process), which lets it write the study dir
        assert cmd.flag("--isolation") == "process" and node["study-dir"] in sandbox.writable
    assert "ReadWritePaths=/var/lib/slmfed-app /srv/slmfed/study" in launcher_text
    assert "ReadWritePaths=/var/lib/slmfed\n" in unit_text  # the SuperNode itself writes only its state
    assert "site-study:/srv/slmfed/study" in (site / "compose.yaml").read_text()


def test_init_refuses_an_invalid_site_policy(tmp_path):
    with pytest.raises(ValueError, match="min-cell-size"):
        init_deployment(DeployPlan(out=tmp_path, superlink_hosts=["h"], sites=["a"],
                                   privacy={**B.DEFAULT_SITE_PRIVACY, "min-cell-size": 2}))
    with pytest.raises(ValueError, match="share-patient-rows: not a site privacy key"):
        init_deployment(DeployPlan(out=tmp_path, superlink_hosts=["h"], sites=["a"],
                                   privacy={**B.DEFAULT_SITE_PRIVACY, "share-patient-rows": False}))
    assert not any(tmp_path.iterdir())


def test_server_certificate_names_the_hosts_and_chains_to_the_ca(generated):
    ca = pki.load_cert(generated / "ca" / "ca.crt")
    cert = pki.load_cert(generated / "coordinator" / "certs" / "server.crt")
    # the public names for the sites, the internal address for the researcher and the name nginx verifies
    assert sorted(pki.san_hosts(cert)) == ["10.0.0.5", "127.0.0.1", "slm.example.org", "slmfed-superlink"]
    assert pki.issued_by(cert, ca)
    key = pki.load_private_key(generated / "coordinator" / "certs" / "server.key")
    assert pki.same_public_key(cert.public_key(), key.public_key())
    other = pki.make_ca()
    assert not pki.issued_by(cert, other.cert)


def test_site_keys_load_the_way_flower_loads_them(generated):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    priv = serialization.load_ssh_private_key((generated / "sites/a/supernode.key").read_bytes(), None)
    assert priv.curve.name == "secp384r1"
    pub_bytes = try_load_public_key(generated / "coordinator/site-keys/a.pub")  # what `flwr supernode register` sends
    pub = serialization.load_ssh_public_key((generated / "sites/a/supernode.pub").read_bytes())
    assert uses_nist_ec_curve(pub) and pki.same_public_key(priv.public_key(), pub) and pub_bytes


def test_init_refuses_to_overwrite_and_writes_nothing(dep):
    key = dep / "sites/a/supernode.key"
    before = key.read_bytes()
    (dep / "sites/b/supernode.key").unlink()  # even a partial re-run must not write anything
    with pytest.raises(pki.PKIError, match="already exists.*--force"):
        init_deployment(DeployPlan(out=dep, superlink_hosts=["slm.example.org"], sites=["a", "b"]))
    assert key.read_bytes() == before and not (dep / "sites/b/supernode.key").exists()
    init_deployment(DeployPlan(out=dep, superlink_hosts=["slm.example.org"], sites=["a", "b"]), force=True)
    assert key.read_bytes() != before and _mode(key) == 0o600


@pytest.mark.parametrize("sites, message", [(["A b"], "lower-case"), (["a", "a"], "duplicates"), ([], "at least one")])
def test_init_rejects_bad_site_names(tmp_path, sites, message):
    with pytest.raises(ValueError, match=message):
        init_deployment(DeployPlan(out=tmp_path, superlink_hosts=["h"], sites=sites))
    assert not any(tmp_path.iterdir())


def test_generated_commands_carry_the_required_flags(generated):
    unit = generated / "coordinator/flower-superlink.service"
    (link,) = collect_commands(unit, unit.read_text())
    for flag in ["--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"]:
        assert link.flag(flag) is not None, flag
    compose = generated / "sites/a/compose.yaml"
    node, launcher = collect_commands(compose, compose.read_text())
    assert launcher.argv == ["slmfed", "site", "launcher", "--supernode", "supernode:9094", "--secret-file",
                             "/etc/slmfed/superexec.secret", "--approved", "/etc/slmfed/approved-apps.toml"]
    unit = generated / "sites/a/flower-supernode.service"
    (node_unit,) = collect_commands(unit, unit.read_text())
    # compose and systemd start the same thing; in compose the Runtime API listens on the internal network
    assert [t for t in node.argv[1:] if t != "0.0.0.0"] == [t for t in node_unit.argv[1:] if t != "127.0.0.1"]
    assert node_unit.flag("--host") == "127.0.0.1"
    assert node.flag("--isolation") == "process" and node.flag("--insecure") is None
    assert node.flag("--superexec-auth-secret-file") == "/etc/slmfed/superexec.secret"
    assert node.flag("--max-retries") == "500" and float(node.flag("--max-wait-time")) == 86400
    assert B.parse_node_config(node.flag("--node-config")) == {
        "cache-dir": "/srv/slmfed/cache", "site-name": "a", "study-dir": "/srv/slmfed/study",
        "signing-key": "/etc/slmfed/study-signing.key", "peer-roster": "/etc/slmfed/peer-roster.toml",
        "min-cell-size": "10", "histogram-bins": "100", "share-histograms": "true", "max-logit-slope": "10.0",
        "max-partitions": "24", "max-studies": "50", "dp-epsilon": "0.0", "dp-delta": "1e-05", "dp-clip-norm": "1.0",
        "dp-lifetime-epsilon": "10.0", "span-audit": "enforce", "model-verification": "enforce",
        "allowed-backbones": "resnet10,resnet18",
        "max-widen-factor": "1.0", "max-ensemble-size": "5", "max-epoch-patients": "5000", "max-reply-mb": "200.0",
        "max-rounds": "50", "min-batch-size": "0", "max-fits-per-study": "64",
        "max-evaluations-per-study": "2000", "max-evaluations": "50000"}
    cfg = tomllib.loads((generated / "coordinator/flwr-config.toml").read_text())
    # the researcher's flwr talks to the SuperLink on the coordinator's loopback, not the front door
    assert cfg["superlink"]["slmfed"] == {"address": "127.0.0.1:9093",
                                          "root-certificates": "/etc/slmfed/certs/ca.crt"}
    assert link.flag("--host") == "127.0.0.1" and link.flag("--port") == "9093"
    script = (generated / "coordinator/register-sites.sh").read_text()
    assert "exec slmfed deploy register-sites . --connection slmfed --registry /var/lib/slmfed/site-registry.toml" in script


# ---------------------------------------------------------------- deploy check

def test_check_passes_on_generated(generated, capsys):
    assert check_deployment(generated) == []
    assert check_deployment(generated / "sites" / "a") == []
    assert deploy_main(["deploy", "check", str(generated)]) == 0
    assert "OK" in capsys.readouterr().out


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def _toml_edit(path: Path, fn) -> None:
    data = tomllib.loads(path.read_text())
    fn(data)
    path.write_text(tomli_w.dumps(data))


def _reissue_server_cert(dep: Path, *, hosts=("slm.example.org",), days_from=-10, days_to=-1, other_key=False):
    ca_key = pki.load_private_key(dep / "ca/ca.key")
    ca_cert = pki.load_cert(dep / "ca/ca.crt")
    key = pki.load_private_key(dep / "coordinator/certs/server.key")
    if other_key:
        key = pki.make_site_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(ca_cert.subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days_from)).not_valid_after(now + dt.timedelta(days=days_to))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (dep / "coordinator/certs/server.crt").write_bytes(pki.cert_pem(cert))


def _v_insecure_site(d):
    _edit(d / "sites/a/flower-supernode.service", "--isolation process", "--insecure --isolation process")


def _v_no_auth(d):
    _edit(d / "coordinator/flower-superlink.service", "--enable-supernode-auth \\\n", "")


def _v_node_no_key(d):
    _edit(d / "sites/b/compose.yaml", '      - "--auth-supernode-private-key"\n      - "/etc/slmfed/supernode.key"\n', "")


def _v_allow_deps(d):
    _edit(d / "coordinator/compose.yaml", "--disable-runtime-dependency-installation", "--allow-runtime-dependency-installation")


def _v_deps_default_on(d):
    _edit(d / "coordinator/compose.yaml", '      - "--disable-runtime-dependency-installation"\n', "")
    _edit(d / "coordinator/compose.yaml", 'FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION: "1"', 'FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION: "0"')


def _v_key_world(d):
    (d / "sites/a/supernode.key").chmod(0o644)


def _v_key_group(d):
    (d / "coordinator/certs/server.key").chmod(0o640)


def _v_missing_cert(d):
    (d / "coordinator/certs/server.crt").unlink()


def _v_garbage_ca(d):
    (d / "sites/b/ca.crt").write_text("not a certificate\n")


def _v_expired(d):
    _reissue_server_cert(d)


def _v_wrong_host(d):
    _reissue_server_cert(d, hosts=("other.example.org",), days_from=-1, days_to=30)


def _v_key_mismatch(d):
    _reissue_server_cert(d, days_from=-1, days_to=30, hosts=("slm.example.org", "10.0.0.5"), other_key=True)


def _v_site_address(d):
    _edit(d / "sites/a/flower-supernode.service", "--superlink slm.example.org:9092", "--superlink 192.0.2.7:9092")


def _v_foreign_ca(d):
    (d / "sites/a/ca.crt").write_bytes(pki.cert_pem(pki.make_ca().cert))


def _v_tls_flag_missing(d):
    _edit(d / "coordinator/flower-superlink.service", "--ssl-keyfile /etc/slmfed/certs/server.key \\\n", "")


def _v_no_root_cert(d):
    _edit(d / "sites/a/flower-supernode.service", "--root-certificates /etc/slmfed/ca.crt \\\n", "")


def _v_unregistered(d):
    (d / "sites/a/supernode.key").write_bytes(pki.ssh_private(pki.make_site_key()))


def _v_dicom_path(d):
    _edit(d / "sites/a/flower-supernode.service", 'cache-dir="/srv/slmfed/cache"', 'cache-dir="/data/site-a/dicom"')


def _v_flwr_insecure(d):
    _edit(d / "coordinator/flwr-config.toml", 'root-certificates = "/etc/slmfed/certs/ca.crt"', "insecure = true")


def _v_dp_table_coordinator(d):  # a [dp] table no code reads: it could only claim what nothing applies
    _toml_edit(d / "coordinator/bundle.toml", lambda t: t.update(
        {"dp": {"enabled": True, "clipping-norm": 1.0, "noise-multiplier": 1.0}}))


def _v_dp_table_site(d):
    _toml_edit(d / "sites/a/bundle.toml", lambda t: t.update({"dp": {"enabled": True, "noise-multiplier": 1.0}}))


def _v_dp_choice_missing(d):
    _toml_edit(d / "sites/b/bundle.toml", lambda t: t["privacy"].pop("dp-epsilon"))


def _v_dp_budget_bad(d):
    _toml_edit(d / "sites/a/bundle.toml", lambda t: t["privacy"].update({"dp-epsilon": -1.0}))


def _v_span_audit_report(d):
    _toml_edit(d / "sites/a/bundle.toml", lambda t: t["privacy"].update({"span-audit": "report"}))


def _v_coord_privacy(d):
    _toml_edit(d / "coordinator/bundle.toml", lambda t: t.update({"privacy": {"min-cell-size": 20}}))


def _v_bins(d):
    _toml_edit(d / "sites/a/bundle.toml", lambda t: t["privacy"].update({"histogram-bins": 1000}))


def _v_k_low(d):
    _toml_edit(d / "sites/b/bundle.toml", lambda t: t["privacy"].update({"min-cell-size": 2}))


def _v_k_not_int(d):
    _toml_edit(d / "sites/b/bundle.toml", lambda t: t["privacy"].update({"min-cell-size": "ten"}))


def _v_patient_rows(d):
    _toml_edit(d / "sites/a/bundle.toml", lambda t: t["privacy"].update({"share-patient-rows": True}))


def _v_no_privacy(d):
    _toml_edit(d / "sites/b/bundle.toml", lambda t: t.pop("privacy"))


def _v_unit_lowers_k(d):
    _edit(d / "sites/a/flower-supernode.service", "min-cell-size=10", "min-cell-size=5")


def _v_compose_more_bins(d):  # still within the ClientApp's bounds, but not what the officer set
    _toml_edit(d / "sites/b/bundle.toml", lambda t: t["privacy"].update({"histogram-bins": 20}))


def _v_unit_k_invalid(d):
    _edit(d / "sites/a/flower-supernode.service", "min-cell-size=10", "min-cell-size=1")


def _v_unit_typo(d):
    _edit(d / "sites/a/flower-supernode.service", "min-cell-size=10", "min-cell-size=10 min-cel-size=20")


def _v_study_elsewhere(d):
    _edit(d / "sites/a/flower-supernode.service", 'study-dir="/srv/slmfed/study"', 'study-dir="/srv/slmfed/other"')


def _v_study_missing(d):
    _edit(d / "sites/b/compose.yaml", 'study-dir=\\"/srv/slmfed/study\\" ', "")


# --- issue 9: least privilege, reviewability, isolation, front door, what each bundle holds
def _v_unit_root(d):
    _edit(d / "sites/a/flower-supernode.service", "User=slmfed\n", "User=root\n")


def _v_no_new_privs_off(d):
    _edit(d / "sites/a/slmfed-launcher.service", "NoNewPrivileges=yes", "NoNewPrivileges=no")


def _v_protect_system_gone(d):
    _edit(d / "coordinator/flower-superlink.service", "ProtectSystem=strict\n", "")


def _v_unit_cache_rw(d):
    _edit(d / "sites/a/slmfed-launcher.service", "ReadWritePaths=/var/lib/slmfed-app", "ReadWritePaths=/srv/slmfed/cache /var/lib/slmfed-app")


def _v_compose_privileged(d):
    _edit(d / "sites/b/compose.yaml", "    read_only: true\n", "    read_only: true\n    privileged: true\n")


def _v_compose_host_network(d):
    _edit(d / "coordinator/compose.yaml", "    read_only: true\n", "    read_only: true\n    network_mode: host\n", )


def _v_compose_no_cap_drop(d):
    text = (d / "sites/b/compose.yaml").read_text()
    (d / "sites/b/compose.yaml").write_text(text.replace("    cap_drop: [ALL]\n", "", 1))


def _v_compose_cache_rw(d):
    _edit(d / "sites/b/compose.yaml", "/srv/slmfed/cache:/srv/slmfed/cache:ro", "/srv/slmfed/cache:/srv/slmfed/cache")


def _v_dropin_no_auth(d):
    drop = d / "sites/a/flower-supernode.service.d"
    drop.mkdir()
    (drop / "override.conf").write_text("[Service]\nExecStart=\nExecStart=/opt/slmfed/.venv/bin/flower-supernode "
                                        "--superlink slm.example.org:9092 --root-certificates /etc/slmfed/ca.crt "
                                        "--isolation process --superexec-auth-secret-file /etc/slmfed/superexec.secret "
                                        "--node-config 'cache-dir=\"/srv/slmfed/cache\"'\n")


def _v_wrapper_script(d):
    _edit(d / "sites/a/flower-supernode.service", "ExecStart=/opt/slmfed/.venv/bin/flower-supernode \\",
          "ExecStart=/usr/local/bin/start-site.sh \\\n    /opt/slmfed/.venv/bin/flower-supernode \\")


def _v_sh_c(d):
    _edit(d / "coordinator/flower-superlink.service", "ExecStart=/opt/slmfed/.venv/bin/flower-superlink \\",
          "ExecStart=/bin/sh -c 'exec /opt/slmfed/.venv/bin/flower-superlink \"$@\"' \\\n    flower-superlink \\")


def _v_env_file_insecure(d):
    (d / "sites/a/extra.env").write_text("EXTRA=--insecure\n")
    _edit(d / "sites/a/flower-supernode.service", "Environment=FLWR_HOME", "EnvironmentFile=/etc/slmfed/extra.env\nEnvironment=FLWR_HOME")
    _edit(d / "sites/a/flower-supernode.service", "    --max-wait-time 86400.0", "    --max-wait-time 86400.0 $EXTRA")


def _v_key_symlink(d):
    key = d / "sites/a/supernode.key"
    target = d / "sites/a-key-copy"
    target.write_bytes(key.read_bytes())
    target.chmod(0o644)
    key.unlink()
    key.symlink_to(target)


def _v_ca_key_in_site(d):
    import shutil
    shutil.copy2(d / "ca/ca.key", d / "sites/b/ca.key")


def _v_extra_key_registered(d):
    (d / "coordinator/extra.pub").write_bytes(pki.ssh_public(pki.make_site_key()))
    _edit(d / "coordinator/register-sites.sh", "exec slmfed", "flwr supernode register extra.pub slmfed --name a\nexec slmfed")


def _v_extra_site_key(d):
    (d / "coordinator/site-keys/mallory.pub").write_bytes(pki.ssh_public(pki.make_site_key()))


def _v_supernode_all_interfaces(d):
    _edit(d / "sites/a/flower-supernode.service", "--host 127.0.0.1", "--host 0.0.0.0")


def _v_health_all_interfaces(d):
    _edit(d / "sites/a/flower-supernode.service", "--port 9094", "--port 9094 \\\n    --health-server-address 0.0.0.0:9095")


def _v_superlink_public(d):
    _edit(d / "coordinator/flower-superlink.service", "--host 127.0.0.1", "--host 0.0.0.0")


def _v_process_no_secret(d):
    _edit(d / "sites/a/flower-supernode.service", "    --superexec-auth-secret-file /etc/slmfed/superexec.secret \\\n", "")


def _v_subprocess_isolation(d):
    _edit(d / "sites/b/flower-supernode.service", "--isolation process", "--isolation subprocess")


def _v_secret_readable(d):
    (d / "sites/b/superexec.secret").chmod(0o644)


def _v_launcher_same_user(d):
    _edit(d / "sites/a/slmfed-launcher.service", "User=slmfed-app", "User=slmfed")


def _v_launcher_egress(d):
    _edit(d / "sites/a/slmfed-launcher.service", "IPAddressDeny=any\n", "")


def _v_launcher_sees_key(d):
    _edit(d / "sites/a/slmfed-launcher.service", "InaccessiblePaths=/etc/slmfed/supernode.key ", "InaccessiblePaths=")


def _v_compose_launcher_online(d):
    _edit(d / "sites/b/compose.yaml", "    internal: true\n", "")


def _v_compose_launcher_key(d):
    _edit(d / "sites/b/compose.yaml", "      - ./approved-apps.toml:", "      - ./:/etc/slmfed:ro\n      - ./approved-apps.toml:")


def _v_front_door_control(d):
    _edit(d / "coordinator/nginx-slmfed.conf", "    location / {\n        return 403;",
          "    location /v1/control/ {\n        proxy_pass https://127.0.0.1:9093;\n    }\n\n    location / {\n        return 403;")


def _v_front_door_everything(d):
    _edit(d / "coordinator/nginx-slmfed-compose.conf", "        return 403;", "        proxy_pass https://slmfed-superlink:9093;")


def _v_front_door_no_verify(d):
    _edit(d / "coordinator/nginx-slmfed.conf", "        proxy_ssl_verify on;\n", "")


def _v_front_door_missing(d):
    (d / "coordinator/nginx-slmfed.conf").unlink()


def _v_compose_superlink_public(d):
    _edit(d / "coordinator/compose.yaml", '"127.0.0.1:9093:9093"', '"9093:9093"')


def _v_approved_broken(d):
    (d / "sites/a/approved-apps.toml").write_text('[apps.latest]\nnote = "whatever the coordinator sends"\n')


BAD_VARIANTS = {
    "insecure flag": (_v_insecure_site, "sites/a/flower-supernode.service: line", "--insecure turns TLS off"),
    "superlink auth off": (_v_no_auth, "coordinator/flower-superlink.service", "SuperNode authentication is off"),
    "supernode auth off": (_v_node_no_key, "sites/b/compose.yaml", "SuperNode authentication is off"),
    "runtime install allowed": (_v_allow_deps, "coordinator/compose.yaml", "--allow-runtime-dependency-installation"),
    "runtime install default": (_v_deps_default_on, "coordinator/compose.yaml", "runtime dependency installation is on"),
    "world-readable key": (_v_key_world, "sites/a/supernode.key", "readable by everyone (mode 0644)"),
    "group-readable key": (_v_key_group, "coordinator/certs/server.key", "readable by its group (mode 0640)"),
    "missing TLS file": (_v_missing_cert, "coordinator/flower-superlink.service", "server.crt is missing"),
    "unreadable CA": (_v_garbage_ca, "sites/b/compose.yaml", "is not a PEM certificate"),
    "expired cert": (_v_expired, "coordinator/certs/server.crt", "expired on"),
    "cert not for host": (_v_wrong_host, "sites/a/bundle.toml", "'slm.example.org' is not in the SuperLink certificate"),
    "key does not match cert": (_v_key_mismatch, "coordinator/flower-superlink.service", "does not match the certificate"),
    "site dials another host": (_v_site_address, "sites/a/flower-supernode.service", "'192.0.2.7' is not in the SuperLink certificate"),
    "site CA is foreign": (_v_foreign_ca, "sites/a/flower-supernode.service", "did not sign the SuperLink certificate"),
    "TLS flag missing": (_v_tls_flag_missing, "coordinator/flower-superlink.service", "--ssl-keyfile is missing"),
    "no root certificates": (_v_no_root_cert, "sites/a/flower-supernode.service", "--root-certificates is missing"),
    "unregistered site key": (_v_unregistered, "sites/a/compose.yaml", "the SuperLink will refuse this SuperNode"),
    "cache is raw DICOM": (_v_dicom_path, "sites/a/flower-supernode.service", "points at raw DICOM"),
    "researcher insecure": (_v_flwr_insecure, "coordinator/flwr-config.toml", "insecure = true turns TLS off"),
    "DP claimed by the coordinator": (_v_dp_table_coordinator, "coordinator/bundle.toml", "[dp] table: no code reads it"),
    "DP table at a site": (_v_dp_table_site, "sites/a/bundle.toml", "[dp] table: no code reads it"),
    "site DP choice not stated": (_v_dp_choice_missing, "sites/b/bundle.toml", "[privacy] dp-epsilon is missing"),
    "DP budget out of bounds": (_v_dp_budget_bad, "sites/a/bundle.toml", "[privacy] dp-epsilon = -1.0"),
    "audit only reported": (_v_span_audit_report, "sites/a/bundle.toml", "span-audit = report answers requests"),
    "coordinator sets privacy": (_v_coord_privacy, "coordinator/bundle.toml", "the coordinator cannot set it"),
    "histogram too fine": (_v_bins, "sites/a/bundle.toml", "histogram-bins = 1000"),
    "k below 3": (_v_k_low, "sites/b/bundle.toml", "[privacy] min-cell-size = 2"),
    "k not a number": (_v_k_not_int, "sites/b/bundle.toml", "expected an integer"),
    "patient rows asked for": (_v_patient_rows, "sites/a/bundle.toml", "share-patient-rows: not a site privacy key"),
    "privacy table missing": (_v_no_privacy, "sites/b/bundle.toml", "[privacy] table is missing"),
    "unit lowers k": (_v_unit_lowers_k, "sites/a/flower-supernode.service",
                      "--node-config min-cell-size=5 differs from the site's privacy policy"),
    "compose out of date": (_v_compose_more_bins, "sites/b/compose.yaml",
                            "--node-config histogram-bins=100 differs from the site's privacy policy"),
    "unit k invalid": (_v_unit_k_invalid, "sites/a/flower-supernode.service", "--node-config min-cell-size = '1'"),
    "unit misspells a policy key": (_v_unit_typo, "sites/a/flower-supernode.service", "min-cel-size: unknown key"),
    "study dir not writable": (_v_study_elsewhere, "sites/a/flower-supernode.service",
                               "study-dir=/srv/slmfed/other is not writable in this sandbox"),
    "study dir not passed": (_v_study_missing, "sites/b/compose.yaml",
                             "no study-dir, so the ClientApp uses /srv/slmfed/cache-study, which is not writable"),
    # issue 9
    "unit runs as root": (_v_unit_root, "sites/a/flower-supernode.service", "flower-supernode runs as root"),
    "NoNewPrivileges=no": (_v_no_new_privs_off, "sites/a/slmfed-launcher.service", "NoNewPrivileges=no: set NoNewPrivileges=yes"),
    "ProtectSystem removed": (_v_protect_system_gone, "coordinator/flower-superlink.service", "ProtectSystem=unset"),
    "unit cache read-write": (_v_unit_cache_rw, "sites/a/slmfed-launcher.service", "makes the cache /srv/slmfed/cache writable"),
    "compose privileged": (_v_compose_privileged, "sites/b/compose.yaml", "privileged: true"),
    "compose host network": (_v_compose_host_network, "coordinator/compose.yaml", "network_mode: host"),
    "compose no cap_drop": (_v_compose_no_cap_drop, "sites/b/compose.yaml", "cap_drop: [ALL] is missing"),
    "compose cache read-write": (_v_compose_cache_rw, "sites/b/compose.yaml", "is mounted read-write; add :ro"),
    "drop-in replaces ExecStart without auth": (_v_dropin_no_auth, "sites/a/flower-supernode.service.d/override.conf",
                                                "SuperNode authentication is off"),
    "ExecStart through a wrapper script": (_v_wrapper_script, "sites/a/flower-supernode.service", "starts 'start-site.sh'"),
    "ExecStart through sh -c": (_v_sh_c, "coordinator/flower-superlink.service", "starts 'sh'"),
    "--insecure through an EnvironmentFile": (_v_env_file_insecure, "sites/a/flower-supernode.service",
                                              "EnvironmentFile=/etc/slmfed/extra.env"),
    "key is a symlink to a 0644 file": (_v_key_symlink, "sites/a/flower-supernode.service", "is a symbolic link"),
    "ca.key copied into a site bundle": (_v_ca_key_in_site, "sites/b/ca.key", "the CA's private key"),
    "extra key in register-sites.sh": (_v_extra_key_registered, "coordinator/register-sites.sh",
                                       "registers extra.pub, which is not the key of a site"),
    "extra key in site-keys": (_v_extra_site_key, "coordinator/site-keys/mallory.pub", "not a site of this deployment"),
    "SuperNode on 0.0.0.0": (_v_supernode_all_interfaces, "sites/a/flower-supernode.service", "--host 0.0.0.0 exposes"),
    "health port on 0.0.0.0": (_v_health_all_interfaces, "sites/a/flower-supernode.service",
                               "--health-server-address 0.0.0.0:9095 exposes its health port"),
    "SuperLink on 0.0.0.0": (_v_superlink_public, "coordinator/flower-superlink.service", "exposes its Control API"),
    "process isolation without a SuperExec secret": (_v_process_no_secret, "sites/a/flower-supernode.service",
                                                     "without --superexec-auth-secret-file"),
    "subprocess isolation": (_v_subprocess_isolation, "sites/b/flower-supernode.service",
                             "--isolation subprocess starts every app"),
    "SuperExec secret readable": (_v_secret_readable, "sites/b/superexec.secret", "readable by everyone (mode 0644)"),
    "launcher as the SuperNode's user": (_v_launcher_same_user, "sites/a/slmfed-launcher.service",
                                         "as the SuperNode's user"),
    "launcher has egress": (_v_launcher_egress, "sites/a/slmfed-launcher.service", "IPAddressDeny=any is missing"),
    "launcher sees the key": (_v_launcher_sees_key, "sites/a/slmfed-launcher.service", "does not hide the SuperNode's key"),
    "compose launcher not internal": (_v_compose_launcher_online, "sites/b/compose.yaml", "network 'apps' is not internal"),
    "compose launcher mounts the key": (_v_compose_launcher_key, "sites/b/compose.yaml", "gives the ClientApp the SuperNode's key"),
    "front door forwards the Control API": (_v_front_door_control, "coordinator/nginx-slmfed.conf",
                                            "location /v1/control/: forwards to the SuperLink"),
    "front door forwards everything": (_v_front_door_everything, "coordinator/nginx-slmfed-compose.conf",
                                       "location /: forwards to the SuperLink"),
    "front door does not verify": (_v_front_door_no_verify, "coordinator/nginx-slmfed.conf", "proxy_ssl_verify on is missing"),
    "front door missing": (_v_front_door_missing, "coordinator", "nginx-slmfed.conf (the nginx front door) is missing"),
    "allow-list broken": (_v_approved_broken, "sites/a/approved-apps.toml", "expected the app's SHA-256"),
    "compose SuperLink port published": (_v_compose_superlink_public, "coordinator/compose.yaml",
                                         "flower-superlink: --host 0.0.0.0 exposes its Control API"),
}


@pytest.mark.parametrize("name", list(BAD_VARIANTS))
def test_check_flags_each_bad_variant(dep, name, capsys):
    breaker, where, problem = BAD_VARIANTS[name]
    breaker(dep)
    findings = check_deployment(dep)
    hits = [f for f in findings if f.path.endswith(where.split(":")[0]) and problem in str(f)]
    assert hits, f"expected '{where}: ...{problem}...', got:\n{_problems(findings)}"
    assert deploy_main(["deploy", "check", str(dep)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert all(": " in line and line.startswith(str(dep)) for line in out)  # one "path: problem" per line


def _v_site_ca_is_a_leaf(d):
    (d / "sites/a/ca.crt").write_bytes((d / "coordinator/certs/server.crt").read_bytes())


def _v_site_pub_mismatch(d):
    (d / "sites/a/supernode.pub").write_bytes(pki.ssh_public(pki.make_site_key()))


def _v_site_dials_elsewhere(d):
    _edit(d / "sites/a/compose.yaml", '"slm.example.org:9092"', '"192.0.2.7:9092"')


def _v_site_ca_key(d):
    import shutil
    shutil.copy2(d / "ca/ca.key", d / "sites/a/ca.key")


# What a site's privacy officer can check with the site bundle alone (no coordinator files): each
# variant is caught with only sites/a given to `deploy check`.
SITE_ALONE_VARIANTS = {
    "CA file is not a CA": (_v_site_ca_is_a_leaf, "sites/a/ca.crt", "not a self-signed CA certificate"),
    "public key does not match the key": (_v_site_pub_mismatch, "sites/a/supernode.pub", "does not match supernode.key"),
    "dials another address than the bundle's": (_v_site_dials_elsewhere, "sites/a/compose.yaml",
                                                "--superlink 192.0.2.7:9092 is not the bundle's [superlink] address"),
    "CA private key in the bundle": (_v_site_ca_key, "sites/a/ca.key", "the CA's private key"),
    "key is a symlink to a 0644 file": (_v_key_symlink, "sites/a/flower-supernode.service", "readable by everyone"),
    "isolation without secret": (_v_process_no_secret, "sites/a/flower-supernode.service",
                                 "without --superexec-auth-secret-file"),
    "launcher has egress": (_v_launcher_egress, "sites/a/slmfed-launcher.service", "IPAddressDeny=any is missing"),
    "unit lowers k": (_v_unit_lowers_k, "sites/a/flower-supernode.service", "differs from the site's privacy policy"),
    "allow-list broken": (_v_approved_broken, "sites/a/approved-apps.toml", "expected the app's SHA-256"),
    "runs as root": (_v_unit_root, "sites/a/flower-supernode.service", "runs as root"),
}


@pytest.mark.parametrize("name", list(SITE_ALONE_VARIANTS))
def test_site_bundle_alone_is_checked(dep, name):
    breaker, where, problem = SITE_ALONE_VARIANTS[name]
    site = dep / "sites/a"
    assert check_deployment(site) == []
    breaker(dep)
    findings = check_deployment(site)
    assert any(f.path.endswith(where) and problem in str(f) for f in findings), \
        f"expected '{where}: ...{problem}...', got:\n{_problems(findings)}"


def test_check_finds_raw_site_folder_and_unprepared_cache(dep, tmp_path):
    site = tmp_path / "site-a"
    (site / "dicom" / "x").mkdir(parents=True)
    (site / "dicom" / "x" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "empty").mkdir()
    for cache, problem in [(site, "raw site folder"), (site / "dicom", "raw DICOM (IM0001)"),
                           (tmp_path / "empty", "no manifest.json")]:
        unit = dep / "sites/a/flower-supernode.service"
        text = unit.read_text()
        unit.write_text(text.replace('cache-dir="/srv/slmfed/cache"', f'cache-dir="{cache}"'))
        assert any(problem in str(f) for f in check_deployment(dep)), problem
        unit.write_text(text)


def test_privacy_problems_validate_as_the_clientapp_does():
    assert B.privacy_problems(dict(B.DEFAULT_SITE_PRIVACY)) == []
    assert B.privacy_problems({}) == []  # every key has a default
    for bad, where in [({"min-cell-size": 2}, "min-cell-size"), ({"histogram-bins": 101}, "histogram-bins"),
                       ({"histogram-bins": 1}, "histogram-bins"), ({"share-histograms": "maybe"}, "share-histograms"),
                       ({"max-partitions": 0}, "max-partitions"), ({"share-patient-rows": False}, "share-patient-rows")]:
        (problem,) = B.privacy_problems(bad)
        assert problem.startswith(f"[privacy] {where}"), problem


# ---------------------------------------------------------------- site join

@pytest.fixture
def cache(tmp_path) -> Path:
    c = tmp_path / "cache"
    c.mkdir()
    (c / "manifest.json").write_text('{"format_version": 1, "patients": {"p1": {"status": "included"}}}')
    return c


def test_join_command_is_the_systemd_command(dep, cache):
    site = dep / "sites/a"
    argv = join_command(site, cache)
    unit = site / "flower-supernode.service"
    (cmd,) = collect_commands(unit, unit.read_text())
    b = B.read_bundle(site)
    expected = [str(b.local(t)) if t.startswith(b.install_dir) else t for t in cmd.argv[1:]]
    # another cache than the bundle's: the study folder sits beside it (writable there), nothing else changes
    expected = [t.replace('cache-dir="/srv/slmfed/cache"', f'cache-dir="{cache.resolve()}"')
                 .replace('study-dir="/srv/slmfed/study"', f'study-dir="{cache.resolve()}-study"')
                 .replace(f'="{b.install_dir}/', f'="{site}/')  # signing-key, peer-roster: the bundle's files
                 for t in expected]
    assert Path(argv[0]).name == "flower-supernode"
    assert [t.replace(str(site.resolve()), str(site)) for t in argv[1:]] == expected


def test_join_passes_the_sites_own_policy(dep, cache):
    site = dep / "sites/a"
    _toml_edit(site / "bundle.toml", lambda t: t["privacy"].update({"min-cell-size": 25, "share-histograms": False}))
    argv = join_command(site, cache)
    node = B.parse_node_config(argv[argv.index("--node-config") + 1])
    cfg = load_config(node_config=node)
    assert cfg["min-cell-size"] == 25 and cfg["share-histograms"] is False and cfg["histogram-bins"] == 100
    # with the bundle's own cache, join passes the bundle's study dir (the one the unit makes writable)
    b = B.read_bundle(site)
    own = B.parse_node_config(B.site_argv(b)[B.site_argv(b).index("--node-config") + 1])
    assert own["study-dir"] == "/srv/slmfed/study" and own["min-cell-size"] == "25"


def test_join_dry_run_prints_the_command(dep, cache, capsys):
    assert deploy_main(["site", "join", "--bundle", str(dep / "sites/b"), "--cache", str(cache),
                        "--dry-run", "--no-preflight"]) == 0
    node_line, launcher_line = capsys.readouterr().out.splitlines()
    argv = shlex.split(node_line)
    assert argv[argv.index("--auth-supernode-private-key") + 1].endswith("sites/b/supernode.key")
    launcher = shlex.split(launcher_line)  # the site's launcher, on the SuperNode's Runtime API port
    assert launcher[1:3] == ["site", "launcher"] and launcher[launcher.index("--supernode") + 1] == \
        f"127.0.0.1:{argv[argv.index('--port') + 1]}"
    assert launcher[launcher.index("--approved") + 1].endswith("sites/b/approved-apps.toml")


@pytest.mark.parametrize("breaker, message", [
    (lambda d, c: (d / "sites/a/supernode.key").unlink(), "private key is missing"),
    (lambda d, c: (d / "sites/a/supernode.key").chmod(0o644), "chmod 600"),
    (lambda d, c: (d / "sites/a/ca.crt").unlink(), "CA certificate is missing"),
    (lambda d, c: (c / "manifest.json").unlink(), "no manifest.json"),
    (lambda d, c: (c / "manifest.json").write_text('{"patients": {}}'), "no included patient"),
    (lambda d, c: (c / "dicom").mkdir(), "raw site folder"),
    (lambda d, c: _toml_edit(d / "sites/a/bundle.toml", lambda t: t["superlink"].update({"insecure": True})),
     "insecure connections are not allowed"),
    (lambda d, c: _toml_edit(d / "sites/a/bundle.toml", lambda t: t.pop("privacy")), "the site's privacy policy"),
    (lambda d, c: _toml_edit(d / "sites/a/bundle.toml", lambda t: t["privacy"].update({"min-cell-size": 1})),
     "min-cell-size = 1"),
])
def test_join_refuses_incomplete_bundle_or_cache(dep, cache, breaker, message, capsys):
    breaker(dep, cache)
    with pytest.raises(JoinError, match=message):
        join_command(dep / "sites/a", cache)
    assert deploy_main(["site", "join", "--bundle", str(dep / "sites/a"), "--cache", str(cache), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err


def test_join_refuses_the_coordinator_bundle(dep, cache):
    with pytest.raises(JoinError, match="coordinator bundle"):
        join_command(dep / "coordinator", cache)


def _tls_server(cert: Path, key: Path):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def serve():
        try:
            conn, _ = sock.accept()
            with conn:
                try:
                    ctx.wrap_socket(conn, server_side=True).close()
                except ssl.SSLError:
                    pass  # the client rejected our certificate: exactly what the test provokes
        except OSError:
            pass  # socket closed by the test
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return sock, t


def test_preflight_accepts_own_superlink_and_rejects_a_foreign_one(tmp_path):
    ours = tmp_path / "ours"
    init_deployment(DeployPlan(out=ours, superlink_hosts=["127.0.0.1"], sites=["a"]))
    theirs = tmp_path / "theirs"
    init_deployment(DeployPlan(out=theirs, superlink_hosts=["127.0.0.1"], sites=["a"]))
    certs = ours / "coordinator/certs"
    for ca, should_pass in [(ours / "sites/a/ca.crt", True), (theirs / "sites/a/ca.crt", False)]:
        sock, t = _tls_server(certs / "server.crt", certs / "server.key")
        try:
            addr = f"127.0.0.1:{sock.getsockname()[1]}"
            if should_pass:
                assert preflight_tls(addr, ca) is None
            else:
                with pytest.raises(JoinError, match="does not verify"):
                    preflight_tls(addr, ca)
        finally:
            sock.close()
            t.join(5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert "not reachable" in preflight_tls(f"127.0.0.1:{free}", ours / "sites/a/ca.crt")


# ---------------------------------------------------------------- site app approval, site registry

def test_site_approve_writes_the_hash_and_revoke_removes_it(dep, tmp_path, capsys):
    import hashlib

    fab = tmp_path / "slmfed.fab"
    fab.write_bytes(b"a built app bundle")
    digest = hashlib.sha256(b"a built app bundle").hexdigest()
    site = dep / "sites/a"
    assert deploy_main(["site", "approve", "--bundle", str(site), str(fab), "--note", "release 0.1.0, reviewed"]) == 0
    assert B.read_approved_apps(site / "approved-apps.toml") == {digest: "release 0.1.0, reviewed"}
    assert check_deployment(site) == []
    assert deploy_main(["site", "approve", "--bundle", str(site), digest, "--revoke"]) == 0
    assert B.read_approved_apps(site / "approved-apps.toml") == {}
    assert deploy_main(["site", "approve", "--bundle", str(site), digest, "--revoke"]) == 2
    assert "is not approved; nothing to revoke" in capsys.readouterr().err
    assert deploy_main(["site", "approve", "--bundle", str(site), str(tmp_path / "nothing-here")]) == 2


def test_launcher_runs_only_approved_apps(tmp_path, monkeypatch):
    from deploy import launcher as L

    allow = tmp_path / "approved-apps.toml"
    allow.write_text(B.approved_apps_text({"a" * 64: "reviewed"}))
    started, refused = [], []
    monkeypatch.setattr(L, "refuse_task", lambda addr, token, h: refused.append((token, h)))
    lau = L.Launcher(supernode="127.0.0.1:1", secret=b"s", approved_file=allow, warm=False)
    monkeypatch.setattr(lau, "launch", lambda token, approved: started.append((token, approved)))
    assert lau.handle("t1", "a" * 64) == "launched"
    assert lau.handle("t2", "b" * 64) == "refused"  # another app: not started, answered with the refusal
    allow.write_text("not toml [")                   # a broken allow-list approves nothing
    assert lau.handle("t3", "a" * 64) == "refused"
    assert started == [("t1", ["a" * 64])] and refused == [("t2", "b" * 64), ("t3", "a" * 64)]


def test_site_registry_is_validated(tmp_path):
    from server.registry import RegistryError, load_site_registry

    reg = tmp_path / "site-registry.toml"
    reg.write_text('[sites.a]\nnode-id = 11\npublic-key = "k"\n[sites.b]\nnode-id = 12\n')
    assert load_site_registry(reg) == {11: "a", 12: "b"}
    for text, problem in [('[sites.a]\nnode-id = 11\n[sites.b]\nnode-id = 11\n', "recorded for both"),
                          ('[sites.a]\nnode-id = "11"\n', "expected a positive 64-bit integer"),
                          ('[sites.a]\nnode-id = -1\n', "expected a positive 64-bit integer"),
                          ('[sites."A b"]\nnode-id = 1\n', "not a site name"),
                          ("[other]\n", "found none")]:
        reg.write_text(text)
        with pytest.raises(RegistryError, match=problem):
            load_site_registry(reg)
    with pytest.raises(RegistryError, match="absolute path"):
        load_site_registry("site-registry.toml")
    with pytest.raises(RegistryError, match="does not exist"):
        load_site_registry(tmp_path / "missing.toml")


def test_federation_enrols_only_recorded_nodes_under_their_recorded_names(caplog):
    from flwr.app import ConfigRecord, RecordDict

    from server.protocol import Federation, Study

    class Grid:
        def get_node_ids(self):
            return [11, 12, 99]  # 99: a registered key nobody recorded as a site

    fed = Federation(Grid(), min_sites=2, timeout_s=1, registered={11: "a", 12: "b"})
    assert fed.node_ids == [11, 12]
    assert "node 99 is connected but not a registered site" in caplog.text
    study = Study.__new__(Study)
    study.fed = fed
    claims_b = RecordDict({"site": ConfigRecord({"site-name": "b"})})
    assert study._site_name(11, claims_b) == "a"  # the record names the site, not the node's claim
    assert "node 11 calls itself 'b' but is registered as 'a'" in caplog.text
    with pytest.raises(Exception, match="only 1 site"):
        Federation(Grid(), min_sites=2, timeout_s=0, registered={11: "a"})


def test_clientapp_process_checks_the_fab_bytes_before_installing(monkeypatch):
    """A SuperLink that announces an approved hash but sends other bytes: refused, nothing installed."""
    import hashlib

    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp as rc

    from deploy import task as T

    for attr in ("_task_id", "_run_id", "_node_id"):  # what pull_task_input sets in a ClientApp process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    good = b"the reviewed app"
    approved = frozenset({hashlib.sha256(good).hexdigest()})
    msg = Message(RecordDict(), dst_node_id=1, message_type="query.info")
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    replies = []
    monkeypatch.setattr(rc, "push_message", lambda client, reply, context: replies.append(reply))
    for fab, ok in [(Fab(hashlib.sha256(good).hexdigest(), good, {}), True),
                    (Fab(hashlib.sha256(good).hexdigest(), b"other code", {}), False),  # announced != content
                    (Fab(hashlib.sha256(b"other").hexdigest(), b"other", {}), False)]:   # honest, not approved
        pull = T.checked_pull(lambda client, f=fab: (msg, ctx, None, f), approved)
        if ok:
            assert pull(None)[3] is fab
        else:
            with pytest.raises(T.AppNotApproved, match="app not approved at this site"):
                pull(None)
    assert len(replies) == 2 and all(r.has_error() and r.error.code == T.APP_NOT_APPROVED_CODE for r in replies)
