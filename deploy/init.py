"""`slmfed deploy init`: CA, SuperLink certificate, site keys and every config, in one folder.

Output (nothing is overwritten unless force=True, and nothing is written when a file exists):
    OUT/ca/ca.crt, ca.key             the CA; keep ca.key offline (needed only to re-issue)
    OUT/coordinator/                  bundle.toml, certs/, site-keys/<site>.pub, systemd unit,
                                      compose.yaml, flwr-config.toml, register-sites.sh
    OUT/sites/<site>/                 bundle.toml, ca.crt, supernode.key/.pub, systemd unit,
                                      compose.yaml  (copy this folder to the site, nothing else)
    OUT/Dockerfile                    the image the compose files run
"""
from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from deploy import bundle as B
from deploy import pki
from deploy.render import compose_command, render, systemd_exec

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
FEDERATION = "slmfed"
DEFAULT_IMAGE = "slmfed:0.1.0"

# Differential privacy is not implemented anywhere in SLM-Fed: the coordinator bundle says so
# explicitly, and `deploy check` rejects a [dp] table that claims otherwise (deploy/README.md).
DEFAULT_DP = {"enabled": False, "clipping-norm": 0.0, "noise-multiplier": 0.0}
# Each site's privacy policy ([privacy] in sites/<name>/bundle.toml; the coordinator has none).
DEFAULT_PRIVACY = B.DEFAULT_SITE_PRIVACY


@dataclass
class DeployPlan:
    out: Path
    superlink_hosts: list[str]
    sites: list[str]
    port: int = B.DEFAULT_SUPERLINK_PORT
    install_dir: str = B.DEFAULT_INSTALL_DIR
    cache_dir: str = B.DEFAULT_CACHE_DIR
    state_dir: str = B.DEFAULT_STATE_DIR
    log_dir: str = B.DEFAULT_LOG_DIR
    venv: str = B.DEFAULT_VENV
    bind_host: str = "0.0.0.0"
    image: str = DEFAULT_IMAGE
    supernode_port: int = B.DEFAULT_SUPERNODE_PORT
    max_retries: int = B.DEFAULT_MAX_RETRIES
    max_wait_time: float = B.DEFAULT_MAX_WAIT_TIME
    dp: dict = field(default_factory=lambda: dict(DEFAULT_DP))
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


def _files(plan: DeployPlan) -> dict[Path, tuple[bytes, bool]]:
    """Every file to write: path -> (content, private)."""
    out, inst = plan.out, plan.install_dir
    ca = pki.make_ca()
    server = pki.make_server_cert(ca, plan.superlink_hosts)
    files: dict[Path, tuple[bytes, bool]] = {
        out / "ca" / "ca.crt": (pki.cert_pem(ca.cert), False),
        out / "ca" / "ca.key": (pki.key_pem(ca.key), True),
        out / "Dockerfile": (render("Dockerfile", image=plan.image).encode(), False),
    }
    coord = out / "coordinator"
    files[coord / B.COORD_CA] = (pki.cert_pem(ca.cert), False)
    files[coord / B.SERVER_CERT] = (pki.cert_pem(server.cert), False)
    files[coord / B.SERVER_KEY] = (pki.key_pem(server.key), True)

    register_lines = []
    for site in plan.sites:
        key = pki.make_site_key()
        sdir = out / "sites" / site
        files[sdir / B.CA_CERT] = (pki.cert_pem(ca.cert), False)
        files[sdir / B.SITE_KEY] = (pki.ssh_private(key), True)
        files[sdir / B.SITE_PUB] = (pki.ssh_public(key, f"slmfed-site-{site}"), False)
        files[coord / B.SITE_KEYS_DIR / f"{site}.pub"] = (pki.ssh_public(key, f"slmfed-site-{site}"), False)
        register_lines.append(shlex.join(
            ["flwr", "supernode", "register", f"{B.SITE_KEYS_DIR}/{site}.pub", FEDERATION, "--name", site]
        ))
        study_dir = B.default_study_dir(plan.cache_dir)  # writable in the unit / compose file, passed as study-dir
        site_toml = {
            "kind": "site",
            "install-dir": inst,
            "superlink": {"address": plan.address},
            "node": {
                "site-name": site,
                "cache-dir": plan.cache_dir,
                "port": plan.supernode_port,
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
        argv = B.site_argv(B.Bundle(root=sdir, kind="site", install_dir=inst, data=site_toml))
        common = dict(site_name=site, install_dir=inst, cache_dir=plan.cache_dir, state_dir=plan.state_dir,
                      study_dir=study_dir, image=plan.image, venv=plan.venv)
        files[sdir / "flower-supernode.service"] = (render(
            "flower-supernode.service", exec_start=systemd_exec(argv, f"{plan.venv}/bin/flower-supernode"), **common
        ).encode(), False)
        files[sdir / "compose.yaml"] = (render("compose-site.yaml", command=compose_command(argv), **common).encode(), False)

    coord_toml = {
        "kind": "coordinator",
        "install-dir": inst,
        "superlink": {"hosts": plan.superlink_hosts, "address": plan.address, "bind-host": plan.bind_host,
                      "port": plan.port, "database": f"{plan.state_dir}/superlink.db",
                      "log-file": f"{plan.log_dir}/superlink.log"},
        "sites": {"names": plan.sites},
        # DP is not implemented: stated as off, and `deploy check` fails on a table that claims it.
        # No [privacy] here: the privacy policy belongs to each site, the coordinator cannot set it.
        "dp": plan.dp,
    }
    files[coord / B.BUNDLE_FILE] = (tomli_w.dumps(coord_toml).encode(), False)
    link_argv = B.superlink_argv(
        ca_cert=f"{inst}/{B.COORD_CA}", server_cert=f"{inst}/{B.SERVER_CERT}", server_key=f"{inst}/{B.SERVER_KEY}",
        host=plan.bind_host, port=plan.port, database=f"{plan.state_dir}/superlink.db",
        log_file=f"{plan.log_dir}/superlink.log",
    )
    common = dict(install_dir=inst, state_dir=plan.state_dir, log_dir=plan.log_dir, image=plan.image, port=plan.port,
                  venv=plan.venv)
    files[coord / "flower-superlink.service"] = (render(
        "flower-superlink.service", exec_start=systemd_exec(link_argv, f"{plan.venv}/bin/flower-superlink"), **common
    ).encode(), False)
    files[coord / "compose.yaml"] = (render("compose-coordinator.yaml", command=compose_command(link_argv), **common).encode(), False)
    files[coord / "flwr-config.toml"] = (render(
        "flwr-config.toml", federation=FEDERATION, address=plan.address, ca_cert=f"{inst}/{B.COORD_CA}"
    ).encode(), False)
    files[coord / "register-sites.sh"] = (render(
        "register-sites.sh", federation=FEDERATION, commands="\n".join(register_lines)
    ).encode(), False)
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
