"""`slmfed deploy init`: CA, SuperLink certificate, site keys and every config, in one folder.

Output (nothing is overwritten unless force=True, and nothing is written when a file exists):
    OUT/ca/ca.crt, ca.key             the CA; keep ca.key offline (needed only to re-issue)
    OUT/coordinator/                  bundle.toml, certs/, site-keys/<site>.pub, systemd unit,
                                      compose.yaml, the nginx front door (nginx-slmfed*.conf),
                                      flwr-config.toml, register-sites.sh, peer-roster.toml
                                      (the sites' signing public keys, for the researcher's
                                      information only: the coordinator never verifies with it)
    OUT/sites/<site>/                 bundle.toml, ca.crt, supernode.key/.pub, superexec.secret,
                                      study-signing.key (the key that signs this site's
                                      contributions; not the SuperNode's key), peer-roster.toml
                                      (every site's public signing key: the same file in every
                                      site bundle), superlink.crt (the SuperLink's certificate:
                                      the names the CA vouches for), systemd units (SuperNode +
                                      launcher), compose.yaml (copy this folder to the site, nothing
                                      else). No approved-apps.toml: the site writes its own allow-list
                                      (`slmfed site approve`), so copying a new bundle over an
                                      installed one keeps the site's approvals.
    OUT/Dockerfile                    the image the compose files run
"""
from __future__ import annotations

import ipaddress
import re
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from common import signing
from deploy import bundle as B
from deploy import pki
from deploy.render import compose_command, render, systemd_exec

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
FEDERATION = "slmfed"
DEFAULT_IMAGE = "slmfed:0.1.0"
NGINX_IMAGE = "nginx:1.27"  # the official image: the coordinator's public front door in compose

# Each site's privacy policy ([privacy] in sites/<name>/bundle.toml; the coordinator has none),
# written out in full, DP included: dp-epsilon = 0.0 (no DP-SGD) until the site's privacy officer
# sets a budget, which client/dp.py applies (deploy/README.md, "Differential privacy").
DEFAULT_PRIVACY = B.DEFAULT_SITE_PRIVACY


@dataclass
class DeployPlan:
    out: Path
    superlink_hosts: list[str]
    sites: list[str]
    port: int = B.DEFAULT_SUPERLINK_PORT           # the public front door (Fleet API only)
    internal_port: int = B.DEFAULT_INTERNAL_PORT   # the SuperLink on the coordinator's loopback
    internal_host: str = B.INTERNAL_HOST
    install_dir: str = B.DEFAULT_INSTALL_DIR
    cache_dir: str = B.DEFAULT_CACHE_DIR
    state_dir: str = B.DEFAULT_STATE_DIR
    log_dir: str = B.DEFAULT_LOG_DIR
    venv: str = B.DEFAULT_VENV
    bind_host: str = "0.0.0.0"
    image: str = DEFAULT_IMAGE
    # the first site's Runtime API port; site i gets supernode_port + i, so that sites that share a
    # host (a test machine, a hospital with two cohorts) never collide
    supernode_port: int = B.DEFAULT_SUPERNODE_PORT
    max_retries: int = B.DEFAULT_MAX_RETRIES
    max_wait_time: float = B.DEFAULT_MAX_WAIT_TIME
    # every site's [privacy] starts from this; each site's privacy officer then edits their own
    privacy: dict = field(default_factory=lambda: dict(DEFAULT_PRIVACY))

    def validate(self) -> None:
        if not self.superlink_hosts:
            raise ValueError("--superlink-host: expected at least one host name or IP address, found none")
        if not self.sites:
            raise ValueError("--sites: expected at least one site name, found none")
        bad = [s for s in self.sites if not SITE_NAME.match(s)]
        if bad:
            raise ValueError(
                f"--sites: site names must be lower-case letters, digits, '.', '_' or '-' "
                f"(starting with a letter or digit), found {', '.join(map(repr, bad))}"
            )
        dup = sorted({s for s in self.sites if self.sites.count(s) > 1})
        if dup:
            raise ValueError(f"--sites: each site name once, found duplicates {', '.join(dup)}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port: expected 1-65535, found {self.port}")
        if not 1 <= self.internal_port <= 65535:
            raise ValueError(f"--internal-port: expected 1-65535, found {self.internal_port}")
        if not ipaddress.ip_address(self.internal_host).is_loopback:
            raise ValueError(f"internal host {self.internal_host}: the SuperLink must listen on loopback only")
        if self.internal_port == self.port and self.internal_host == self.bind_host:
            raise ValueError("--internal-port: the SuperLink and the front door need different addresses")
        last = self.supernode_port + len(self.sites) - 1
        if not 1 <= self.supernode_port or last > 65535:
            raise ValueError(f"--supernode-port: expected 1-{65536 - len(self.sites)} for {len(self.sites)} site(s), "
                             f"found {self.supernode_port}")
        if self.supernode_port <= self.internal_port <= last and ipaddress.ip_address(self.internal_host).is_loopback:
            raise ValueError(f"--supernode-port: the sites' Runtime API ports {self.supernode_port}-{last} include "
                             f"the SuperLink's internal port {self.internal_port}")
        problems = B.privacy_problems(self.privacy, "site privacy policy:")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def address(self) -> str:
        host = self.superlink_hosts[0]
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"{host}:{self.port}"


def _host_port(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def front_door_key_lines(site_pubs: dict) -> str:
    """The front door's map of the sites' `flwr-public-key` header values (one line per site)."""
    return "\n".join(f'    "{pki.flower_public_key_b64(pub)}" 1;  # {site}' for site, pub in sorted(site_pubs.items()))


def _files(plan: DeployPlan) -> dict[Path, tuple[bytes, bool]]:
    """Every file to write: path -> (content, private)."""
    out, inst = plan.out, plan.install_dir
    ca = pki.make_ca()
    # public names for the sites; the internal address and name for the researcher's flwr and nginx
    server = pki.make_server_cert(ca, [*plan.superlink_hosts, plan.internal_host, B.INTERNAL_NAME])
    files: dict[Path, tuple[bytes, bool]] = {
        out / "ca" / "ca.crt": (pki.cert_pem(ca.cert), False),
        out / "ca" / "ca.key": (pki.key_pem(ca.key), True),
        out / "Dockerfile": (render("Dockerfile", image=plan.image).encode(), False),
    }
    coord = out / "coordinator"
    files[coord / B.COORD_CA] = (pki.cert_pem(ca.cert), False)
    files[coord / B.SERVER_CERT] = (pki.cert_pem(server.cert), False)
    files[coord / B.SERVER_KEY] = (pki.key_pem(server.key), True)
    registry = f"{plan.state_dir}/{B.SITE_REGISTRY}"
    app_state_dir = f"{plan.state_dir}-app"
    # Model verification: one signing key per site (not the SuperNode's key: the ClientApp signs with
    # it) and one peer roster of every site's public key, the same file in every site bundle.
    signing_keys = {site: signing.new_key() for site in plan.sites}
    roster = signing.roster_text({site: signing.public_b64(k) for site, k in signing_keys.items()}).encode()
    files[coord / B.PEER_ROSTER] = (roster, False)  # the researcher's information; the coordinator never verifies

    site_pubs: dict[str, object] = {}
    for index, site in enumerate(plan.sites):
        key = pki.make_site_key()
        site_pubs[site] = key.public_key()
        site_port = plan.supernode_port + index  # never two sites on one Runtime API port
        sdir = out / "sites" / site
        files[sdir / B.CA_CERT] = (pki.cert_pem(ca.cert), False)
        files[sdir / B.SITE_KEY] = (pki.ssh_private(key), True)
        files[sdir / B.SITE_PUB] = (pki.ssh_public(key, f"slmfed-site-{site}"), False)
        files[sdir / B.SUPEREXEC_SECRET] = (secrets.token_hex(32).encode(), True)
        # no approved-apps.toml: the site's allow-list is the site's, written by `slmfed site approve`;
        # a bundle without one (re-)copied over an installed folder leaves the site's approvals alone
        files[sdir / B.SUPERLINK_CERT] = (pki.cert_pem(server.cert), False)
        files[sdir / B.SIGNING_KEY] = (signing.private_pem(signing_keys[site]), True)
        files[sdir / B.PEER_ROSTER] = (roster, False)
        files[coord / B.SITE_KEYS_DIR / f"{site}.pub"] = (pki.ssh_public(key, f"slmfed-site-{site}"), False)
        study_dir = B.default_study_dir(plan.cache_dir)  # writable in the launcher's sandbox, passed as study-dir
        site_toml = {
            "kind": "site",
            "install-dir": inst,
            # the deployment CA pinned by fingerprint: `deploy check` of this bundle alone compares ca.crt
            # (and superlink.crt, which must carry the address) with it
            "superlink": {"address": plan.address, "ca-sha256": pki.fingerprint(ca.cert)},
            "node": {
                "site-name": site,
                "cache-dir": plan.cache_dir,
                "port": site_port,
                "max-retries": plan.max_retries,
                "max-wait-time": plan.max_wait_time,
                "isolation": B.SUPERNODE_ISOLATION,
                "study-dir": study_dir,
            },
            # The site's privacy policy: owned and edited by the site's privacy officer, passed to
            # the ClientApp in --node-config (the only place it reads it from); see deploy/README.md.
            "privacy": dict(plan.privacy),
        }
        files[sdir / B.BUNDLE_FILE] = (tomli_w.dumps(site_toml).encode(), False)
        # the one argv builder `slmfed site join` uses too: same flags, same policy, same study dir
        b = B.Bundle(root=sdir, kind="site", install_dir=inst, data=site_toml)
        argv = B.site_argv(b)
        common = dict(site_name=site, install_dir=inst, cache_dir=plan.cache_dir, state_dir=plan.state_dir,
                      study_dir=study_dir, image=plan.image, venv=plan.venv, app_state_dir=app_state_dir,
                      approved=B.APPROVED_APPS, secret=B.SUPEREXEC_SECRET, key=B.SITE_KEY, app_user=B.APP_USER,
                      signing_key=B.SIGNING_KEY, roster=B.PEER_ROSTER)
        files[sdir / "flower-supernode.service"] = (render(
            "flower-supernode.service", exec_start=systemd_exec(argv, f"{plan.venv}/bin/flower-supernode"), **common
        ).encode(), False)
        launcher = B.launcher_argv(supernode=f"127.0.0.1:{site_port}", secret="%d/superexec-secret",
                                   approved=f"{inst}/{B.APPROVED_APPS}")
        files[sdir / B.LAUNCHER_UNIT] = (render(
            B.LAUNCHER_UNIT, exec_start=systemd_exec(launcher, f"{plan.venv}/bin/slmfed"), **common
        ).encode(), False)
        # compose: the launcher container reaches the SuperNode's Runtime API over the internal network
        compose_argv = B.site_argv(b, runtime_host="0.0.0.0")
        compose_launcher = B.launcher_argv(supernode=f"supernode:{site_port}",
                                           secret=f"{inst}/{B.SUPEREXEC_SECRET}", approved=f"{inst}/{B.APPROVED_APPS}")
        files[sdir / "compose.yaml"] = (render(
            "compose-site.yaml", command=compose_command(compose_argv),
            launcher_command=compose_command(compose_launcher), **common).encode(), False)

    internal = _host_port(plan.internal_host, plan.internal_port)
    coord_toml = {
        "kind": "coordinator",
        "install-dir": inst,
        "superlink": {"hosts": plan.superlink_hosts, "address": plan.address, "bind-host": plan.bind_host,
                      "port": plan.port, "internal-host": plan.internal_host, "internal-port": plan.internal_port,
                      "database": f"{plan.state_dir}/superlink.db", "log-file": f"{plan.log_dir}/superlink.log"},
        "sites": {"names": plan.sites, "registry": registry},
        # No [privacy] and no DP settings here: both belong to each site, the coordinator cannot set them.
    }
    files[coord / B.BUNDLE_FILE] = (tomli_w.dumps(coord_toml).encode(), False)
    link_kw = dict(ca_cert=f"{inst}/{B.COORD_CA}", server_cert=f"{inst}/{B.SERVER_CERT}",
                   server_key=f"{inst}/{B.SERVER_KEY}", port=plan.internal_port,
                   database=f"{plan.state_dir}/superlink.db", log_file=f"{plan.log_dir}/superlink.log")
    link_argv = B.superlink_argv(host=plan.internal_host, **link_kw)
    common = dict(install_dir=inst, state_dir=plan.state_dir, log_dir=plan.log_dir, image=plan.image, port=plan.port,
                  venv=plan.venv, internal=internal, internal_host=plan.internal_host,
                  internal_port=plan.internal_port, internal_name=B.INTERNAL_NAME, front_door=B.FRONT_DOOR,
                  front_door_compose=B.FRONT_DOOR_COMPOSE, nginx_image=NGINX_IMAGE)
    files[coord / "flower-superlink.service"] = (render(
        "flower-superlink.service", exec_start=systemd_exec(link_argv, f"{plan.venv}/bin/flower-superlink"), **common
    ).encode(), False)
    # compose: inside its container the SuperLink listens on the coordinator network (nginx reaches it
    # there); compose publishes its port on the host's loopback only
    files[coord / "compose.yaml"] = (render(
        "compose-coordinator.yaml", command=compose_command(B.superlink_argv(host="0.0.0.0", **link_kw)), **common
    ).encode(), False)
    door = dict(cert=f"{inst}/{B.SERVER_CERT}", key=f"{inst}/{B.SERVER_KEY}", ca=f"{inst}/{B.COORD_CA}",
                internal_name=B.INTERNAL_NAME, site_key_lines=front_door_key_lines(site_pubs),
                max_body_bytes=B.FLEET_MAX_BODY_BYTES, chunk_bytes=B.FLEET_CHUNK_BYTES,
                margin_bytes=B.FLEET_BODY_MARGIN_BYTES, conn_per_ip=B.FRONT_DOOR_CONN_PER_IP,
                req_rate=B.FRONT_DOOR_REQ_RATE, req_burst=B.FRONT_DOOR_REQ_BURST)
    files[coord / B.FRONT_DOOR] = (render(
        "nginx-front-door.conf", where="systemd: copy to /etc/nginx/conf.d/slmfed.conf (nginx reads the key as root).",
        listen=_host_port(plan.bind_host, plan.port), upstream=internal, access_log=B.FRONT_DOOR_ACCESS_LOG,
        **door).encode(), False)
    files[coord / B.FRONT_DOOR_COMPOSE] = (render(
        "nginx-front-door.conf", where="compose: mounted into the front-door container by compose.yaml.",
        listen=str(plan.port), upstream=f"{B.INTERNAL_NAME}:{plan.internal_port}",
        access_log="/var/log/nginx/access.log", **door).encode(), False)
    files[coord / "flwr-config.toml"] = (render(
        "flwr-config.toml", federation=FEDERATION, address=internal, ca_cert=f"{inst}/{B.COORD_CA}"
    ).encode(), False)
    files[coord / "register-sites.sh"] = (render(
        "register-sites.sh", federation=FEDERATION, registry=registry).encode(), False)
    return files


def init_deployment(plan: DeployPlan, *, force: bool = False) -> list[Path]:
    """Generate everything; refuses (writing nothing) when any target exists and force is False."""
    plan.validate()
    files = _files(plan)
    if not force:
        existing = [p for p in files if p.exists()]
        if existing:
            raise pki.PKIError(
                f"{existing[0]}: already exists ({len(existing)} of the files to generate do); "
                "refusing to overwrite keys or certificates (use --force to replace them all)"
            )
    for path, (data, private) in sorted(files.items()):
        pki.write_file(path, data, private=private, force=force)
    (plan.out / "coordinator" / "register-sites.sh").chmod(0o755)
    return sorted(files)
