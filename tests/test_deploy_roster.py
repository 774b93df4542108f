"""deploy: the sites' signing keys and peer roster (model verification), as `deploy init` writes them,
the SuperNode passes them, `deploy check` reviews them and `site join` requires them (no Flower processes)."""
from __future__ import annotations

import shutil
import stat
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w

from common import signing
from common.cli import main as deploy_main
from common.config import load_config
from deploy import bundle as B
from deploy.check import Checker, check_deployment, collect_commands
from deploy.init import DeployPlan, init_deployment
from deploy.join import JoinError, check_bundle, join_command
from tests.test_deploy import _edit

SITES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("roster") / "out"
    init_deployment(DeployPlan(out=out, superlink_hosts=["slm.example.org"], sites=SITES))
    return out


@pytest.fixture
def dep(generated, tmp_path) -> Path:
    """A private copy of the generated deployment that a test may break."""
    out = tmp_path / "dep"
    shutil.copytree(generated, out)  # copy2 keeps the 0600 modes
    return out


@pytest.fixture
def cache(tmp_path) -> Path:
    c = tmp_path / "cache"
    c.mkdir()
    (c / "manifest.json").write_text('{"format_version": 1, "patients": {"p1": {"status": "included"}}}')
    return c


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _node_config(path: Path, index: int = 0) -> dict[str, str]:
    cmd = [c for c in collect_commands(path, path.read_text()) if c.program == "flower-supernode"][index]
    return B.parse_node_config(cmd.flag("--node-config"))


def _pub(site_dir: Path) -> str:
    return signing.public_b64(signing.load_private_key(str(site_dir / B.SIGNING_KEY)))


# ---------------------------------------------------------------- deploy init

def test_init_writes_a_signing_key_per_site_and_one_roster_of_all(generated):
    rosters = {}
    pubs = {}
    for site in SITES:
        sdir = generated / "sites" / site
        key, roster = sdir / "study-signing.key", sdir / "peer-roster.toml"
        assert _mode(key) == 0o600 and _mode(roster) == 0o644  # the key is private, the roster public
        pubs[site] = _pub(sdir)
        rosters[site] = roster.read_bytes()
        # not the SuperNode's authentication key: another file, another algorithm
        assert key.read_bytes() != (sdir / "supernode.key").read_bytes()
        # a site bundle holds its own signing key only
        assert [p.name for p in sdir.rglob("*") if signing_key(p)] == ["study-signing.key"]
    assert len(set(pubs.values())) == len(SITES)  # one key per site
    coord = generated / "coordinator" / "peer-roster.toml"
    # the same roster in every site bundle (and, for the researcher's information, the coordinator's)
    assert set(rosters.values()) == {coord.read_bytes()}
    roster = signing.Roster.load(str(generated / "sites/a/peer-roster.toml"))
    assert {s: signing.public_b64(k) for s, k in roster.keys.items()} == pubs  # every site, with its own key
    assert tomllib.loads(coord.read_text()) == {"sites": pubs}
    # the coordinator bundle holds no signing key: it cannot sign as a site
    assert not any(signing_key(p) for p in (generated / "coordinator").rglob("*"))
    assert not (generated / "coordinator" / "study-signing.key").exists()


def signing_key(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        signing.load_private_key(str(path))
    except signing.SigningError:
        return False
    return True


def test_a_signed_contribution_of_one_site_verifies_with_another_sites_roster(generated):
    """What the ClientApps do with these files: a signs, b's roster (the same file) accepts it."""
    key = signing.load_private_key(str(generated / "sites/a/study-signing.key"))
    text, sig = signing.sign(key, {"site": "a", "kind": "update", "round": 1})
    roster_b = signing.Roster.load(str(generated / "sites/b/peer-roster.toml"))
    assert roster_b.verify("a", text.encode(), sig)
    assert not roster_b.verify("c", text.encode(), sig)  # not as another site
    assert not roster_b.verify("mallory", text.encode(), sig)  # nor as a site the roster does not list


# ---------------------------------------------------------------- the SuperNode's node config

def test_supernode_argv_carries_the_signing_key_and_the_roster(generated, cache):
    site = generated / "sites/a"
    for path, index in ((site / "flower-supernode.service", 0), (site / "compose.yaml", 0)):
        node = _node_config(path, index)
        assert node["signing-key"] == "/etc/slmfed/study-signing.key"
        assert node["peer-roster"] == "/etc/slmfed/peer-roster.toml"
        cfg = load_config(node_config=node)  # site-only keys: the ClientApp reads them from its node config
        assert cfg["signing-key"] == node["signing-key"] and cfg["model-verification"] == "enforce"
    b = B.read_bundle(site)
    argv = B.site_argv(b, installed=False)  # what `slmfed site join` starts: the bundle folder's files
    node = B.parse_node_config(argv[argv.index("--node-config") + 1])
    assert node["signing-key"] == str(site / "study-signing.key")
    assert node["peer-roster"] == str(site / "peer-roster.toml")
    argv = join_command(site, cache)
    node = B.parse_node_config(argv[argv.index("--node-config") + 1])
    assert Path(node["signing-key"]) == (site / "study-signing.key").resolve()
    assert Path(node["peer-roster"]) == (site / "peer-roster.toml").resolve()


def test_the_clientapp_can_read_the_signing_key_and_the_supernode_cannot(generated):
    site = generated / "sites/a"
    (launcher,) = collect_commands(site / "slmfed-launcher.service", (site / "slmfed-launcher.service").read_text())
    (node,) = collect_commands(site / "flower-supernode.service", (site / "flower-supernode.service").read_text())
    # systemd: the launcher (user slmfed-app, which starts the ClientApp) reads both files read-only, the
    # SuperNode's key stays hidden from it; the SuperNode's own sandbox hides the signing key
    assert launcher.last("User") == B.APP_USER
    assert {"/etc/slmfed/study-signing.key", "/etc/slmfed/peer-roster.toml"} <= set(launcher.paths("ReadOnlyPaths"))
    assert not {"/etc/slmfed/study-signing.key", "/etc/slmfed/peer-roster.toml"} & set(launcher.paths("InaccessiblePaths"))
    assert "/etc/slmfed/supernode.key" in launcher.paths("InaccessiblePaths")
    assert "/etc/slmfed/study-signing.key" in node.paths("InaccessiblePaths")
    # the unit says who must own the key (a 0600 file the ClientApp's user can read)
    assert "chown slmfed-app: /etc/slmfed/study-signing.key" in (site / "slmfed-launcher.service").read_text()
    # compose: the launcher container mounts exactly these two files read-only, never the SuperNode's key
    _node, comp_launcher = collect_commands(site / "compose.yaml", (site / "compose.yaml").read_text())
    vols = comp_launcher.service["volumes"]
    assert "./study-signing.key:/etc/slmfed/study-signing.key:ro" in vols
    assert "./peer-roster.toml:/etc/slmfed/peer-roster.toml:ro" in vols
    assert not any("supernode.key" in v or v.startswith("./:") for v in vols)


# ---------------------------------------------------------------- deploy check

def test_check_passes_on_a_fresh_init_and_without_a_coordinator_roster(dep):
    assert check_deployment(dep) == []
    for site in SITES:
        assert check_deployment(dep / "sites" / site) == []
    (dep / "coordinator/peer-roster.toml").unlink()  # the coordinator never verifies: its copy is optional
    assert check_deployment(dep) == []
    assert not [f for f in check_deployment(dep / "coordinator") if "roster" in str(f) or "signing" in str(f)]


def _roster(d: Path, site: str, keys: dict[str, str]) -> None:
    (d / "sites" / site / "peer-roster.toml").write_text(signing.roster_text(keys))


def _all_pubs(d: Path) -> dict[str, str]:
    return {s: _pub(d / "sites" / s) for s in SITES}


def _v_no_roster(d):
    (d / "sites/a/peer-roster.toml").unlink()


def _v_no_key(d):
    (d / "sites/a/study-signing.key").unlink()


def _v_roster_without_self(d):
    _roster(d, "a", {k: v for k, v in _all_pubs(d).items() if k != "a"})


def _v_roster_wrong_own_key(d):
    _roster(d, "a", {**_all_pubs(d), "a": signing.public_b64(signing.new_key())})


def _v_own_key_replaced(d):  # the key of another deployment: the roster no longer matches it
    (d / "sites/a/study-signing.key").write_bytes(signing.private_pem(signing.new_key()))
    (d / "sites/a/study-signing.key").chmod(0o600)


def _v_verification_off(d):
    path = d / "sites/a/bundle.toml"
    data = tomllib.loads(path.read_text())
    data["privacy"]["model-verification"] = "off"
    path.write_text(tomli_w.dumps(data))


def _v_unit_verification_off(d):
    _edit(d / "sites/a/flower-supernode.service", 'model-verification="enforce"', 'model-verification="off"')


def _v_unit_simulation_key(d):
    _edit(d / "sites/a/flower-supernode.service", 'signing-key="/etc/slmfed/study-signing.key"',
          f'signing-key="{signing.SIMULATION}a"')


def _v_compose_simulation_roster(d):
    _edit(d / "sites/a/compose.yaml", 'peer-roster=\\"/etc/slmfed/peer-roster.toml\\"',
          f'peer-roster=\\"{signing.SIMULATION}a,b,c\\"')


def _v_roster_garbage(d):
    (d / "sites/a/peer-roster.toml").write_text("[sites\n")


def _v_roster_bad_key(d):
    (d / "sites/a/peer-roster.toml").write_text('[sites]\n"a" = "not base64!"\n')


def _v_key_world_readable(d):
    (d / "sites/a/study-signing.key").chmod(0o644)


def _v_unit_no_signing_key(d):
    _edit(d / "sites/a/flower-supernode.service", 'signing-key="/etc/slmfed/study-signing.key" ', "")


def _v_unit_other_roster(d):
    _edit(d / "sites/a/flower-supernode.service", 'peer-roster="/etc/slmfed/peer-roster.toml"',
          'peer-roster="/etc/slmfed/other-roster.toml"')


def _v_launcher_hides_key(d):
    _edit(d / "sites/a/slmfed-launcher.service", "InaccessiblePaths=/etc/slmfed/supernode.key ",
          "InaccessiblePaths=/etc/slmfed/supernode.key /etc/slmfed/study-signing.key ")


def _v_compose_launcher_no_roster(d):
    _edit(d / "sites/a/compose.yaml", "      - ./peer-roster.toml:/etc/slmfed/peer-roster.toml:ro\n", "")


def _v_roster_misses_a_peer(d):
    _roster(d, "a", {k: v for k, v in _all_pubs(d).items() if k != "c"})


def _v_roster_wrong_peer_key(d):
    _roster(d, "a", {**_all_pubs(d), "b": signing.public_b64(signing.new_key())})


def _v_signing_key_at_coordinator(d):
    shutil.copy2(d / "sites/b/study-signing.key", d / "coordinator/b-signing.key")


def _v_other_sites_key_in_bundle(d):
    shutil.copy2(d / "sites/b/study-signing.key", d / "sites/a/b-signing.key")


# name: (breaker, path the finding names, text it contains, caught with the site bundle alone)
ROSTER_VARIANTS = {
    "(a) no peer roster": (_v_no_roster, "sites/a", "peer-roster.toml (the peer roster) is missing", True),
    "(b) no signing key": (_v_no_key, "sites/a", "study-signing.key (the site's signing key) is missing", True),
    "(c) roster does not list the site": (_v_roster_without_self, "sites/a/peer-roster.toml",
                                          "does not list this site ('a')", True),
    "(c) roster lists another key for the site": (_v_roster_wrong_own_key, "sites/a/peer-roster.toml",
                                                  "lists this site ('a') with another public key", True),
    "(c) signing key replaced": (_v_own_key_replaced, "sites/a/peer-roster.toml",
                                 "lists this site ('a') with another public key", True),
    "(d) model verification off": (_v_verification_off, "sites/a/bundle.toml",
                                   "a real site must verify every model it computes on", True),
    "(e) unit passes a simulation key": (_v_unit_simulation_key, "sites/a/flower-supernode.service",
                                         "signing-key=simulation:a: a simulation key", True),
    "(e) compose passes a simulation roster": (_v_compose_simulation_roster, "sites/a/compose.yaml",
                                               "peer-roster=simulation:a,b,c: a simulation key", True),
    "(d) unit switches verification off": (_v_unit_verification_off, "sites/a/flower-supernode.service",
                                           "a real site must verify every model it computes on", True),
    "roster not TOML": (_v_roster_garbage, "sites/a/peer-roster.toml", "not valid TOML", True),
    "roster key not base64": (_v_roster_bad_key, "sites/a/peer-roster.toml", "not a base64 Ed25519 public key", True),
    "signing key world-readable": (_v_key_world_readable, "sites/a/study-signing.key",
                                   "readable by everyone (mode 0644)", True),
    "node config without signing key": (_v_unit_no_signing_key, "sites/a/flower-supernode.service",
                                        "--node-config signing-key is missing", True),
    "node config names another roster": (_v_unit_other_roster, "sites/a/flower-supernode.service",
                                         "is not the bundle's peer-roster.toml", True),
    "launcher hides the signing key": (_v_launcher_hides_key, "sites/a/slmfed-launcher.service",
                                       "the ClientApp cannot read /etc/slmfed/study-signing.key", True),
    "compose launcher without the roster": (_v_compose_launcher_no_roster, "sites/a/compose.yaml",
                                            "mounts no volume with it: the ClientApp cannot read "
                                            "/etc/slmfed/peer-roster.toml", True),
    "roster misses a peer": (_v_roster_misses_a_peer, "sites/a/peer-roster.toml",
                             "does not list site 'c' of this deployment", False),
    "roster has a wrong peer key": (_v_roster_wrong_peer_key, "sites/a/peer-roster.toml",
                                    "lists site 'b' with another public key", False),
    "signing key in the coordinator bundle": (_v_signing_key_at_coordinator, "coordinator/b-signing.key",
                                              "signing key (Ed25519) in the coordinator bundle", False),
    "another site's signing key in a site bundle": (_v_other_sites_key_in_bundle, "sites/a/b-signing.key",
                                                    "does not belong in a site bundle", True),
}


@pytest.mark.parametrize("name", list(ROSTER_VARIANTS))
def test_check_flags_each_roster_and_signing_problem(dep, name, capsys):
    breaker, where, problem, alone = ROSTER_VARIANTS[name]
    breaker(dep)
    targets = [dep, dep / "sites/a"] if alone else [dep]
    for target in targets:
        findings = check_deployment(target)
        hits = [f for f in findings if f.path.endswith(where) and problem in f.problem]
        assert hits, f"{target}: expected '{where}: ...{problem}...', got:\n" + "\n".join(map(str, findings))
    assert deploy_main(["deploy", "check", str(dep)]) == 1
    capsys.readouterr()


def test_check_wants_the_installed_signing_key_owned_by_the_app_user(dep, monkeypatch):
    """Where a systemd site bundle is installed (checked in its install-dir, the app user exists), the
    0600 signing key must belong to the ClientApp's user, or the ClientApp cannot read it."""
    import os
    import pwd

    site = dep / "sites/a"
    data = tomllib.loads((site / "bundle.toml").read_text())
    bundle = B.Bundle(root=site, kind="site", install_dir=str(site), data=data)  # as if installed here
    me = os.stat(site / B.SIGNING_KEY).st_uid
    for app_uid, flagged in ((me + 12345, True), (me, False)):
        monkeypatch.setattr(pwd, "getpwnam", lambda name, uid=app_uid: SimpleNamespace(pw_uid=uid, pw_name=name))
        checker = Checker(dep)
        checker.check_signing_key_owner(bundle, site / B.SIGNING_KEY)
        found = [str(f) for f in checker.findings]
        assert bool(found) == flagged, found
        if flagged:
            assert "not slmfed-app" in found[0] and f"chown slmfed-app: {site / B.SIGNING_KEY}" in found[0]
    # a bundle folder that is not installed (the coordinator's deployment folder): nothing to say
    checker = Checker(dep)
    checker.check_signing_key_owner(B.read_bundle(site), site / B.SIGNING_KEY)
    assert not checker.findings


# ---------------------------------------------------------------- site join

@pytest.mark.parametrize("breaker, file, message", [
    (_v_no_roster, "peer-roster.toml", "the peer roster (the sites whose signed contributions this site accepts) "
                                       "is missing"),
    (_v_no_key, "study-signing.key", "the site's signing key is missing"),
    (_v_key_world_readable, "study-signing.key", "chmod 600"),
    (_v_roster_garbage, "peer-roster.toml", "cannot be read as TOML"),
    (_v_roster_without_self, "peer-roster.toml", "does not list this site ('a')"),
    (_v_roster_wrong_own_key, "peer-roster.toml", "lists site 'a' with another public key"),
    (_v_own_key_replaced, "peer-roster.toml", "lists site 'a' with another public key"),
])
def test_join_refuses_a_bundle_without_a_valid_roster_or_key(dep, cache, breaker, file, message, capsys):
    check_bundle(B.read_bundle(dep / "sites/a"))  # the fresh bundle passes
    breaker(dep)
    with pytest.raises(JoinError, match="^" + str(dep / "sites/a" / file)) as err:
        join_command(dep / "sites/a", cache)
    assert message in str(err.value)
    assert deploy_main(["site", "join", "--bundle", str(dep / "sites/a"), "--cache", str(cache), "--dry-run",
                        "--no-preflight"]) == 2
    assert message in capsys.readouterr().err
