"""`slmfed deploy check DIR`: lint the deployment files a privacy officer reviews.

Why: a deployment is safe only if every command line keeps TLS, SuperNode authentication and
runtime dependency installation the way `deploy init` generated them, and if every private key
stays private. The checker reads what will actually run (systemd ExecStart lines, compose
commands, shell scripts, Flower connection files, bundle.toml) and reports one line per finding,
"path: problem". It passes on what `deploy init` generates.

Privacy settings: each site's bundle.toml holds the site's privacy policy ([privacy], validated as
the ClientApp validates its node config), and every SuperNode command must pass exactly that
policy in --node-config, DP choice included (dp-epsilon, stated explicitly; client/dp.py applies
it); the coordinator bundle holds no [privacy] (it cannot set it), and no bundle holds a [dp] table
(no code reads one: it could only claim a protection nothing applies).

Model verification: each site bundle holds the site's signing key (study-signing.key, 0600) and its
peer roster (peer-roster.toml), which lists the site itself with that key's public key (and, when the
whole deployment is checked, every other site with its key); every SuperNode command passes exactly
these two files in --node-config (never a `simulation:` key, which anyone can derive), the ClientApp's
sandbox can read them, and no site bundle switches model verification off.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import yaml
from cryptography import x509

from common import signing
from common.config import SCHEMA, SITE_POLICY_KEYS
from deploy import bundle as B
from deploy import pki

TEXT_SUFFIXES = {".service", ".yaml", ".yml", ".sh", ".toml", ".env", ".conf", ".cfg", ".ini"}
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode")
LAUNCHER = "slmfed site launcher"  # the site's app launcher (deploy/launcher.py)
REVIEWED = (*FLOWER_PROGRAMS, LAUNCHER)
MAX_SCAN_BYTES = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
STUDY_K = int(SCHEMA["min-cell-size"].default)  # the study default k (10); lower is a warning
# request headers a log format must not write: Flower's signed SuperNode headers (replayable for about
# 5 minutes), any other request header, request bodies
LOGGED_SECRETS = re.compile(r"\$(http_(?!referer\b|user_agent\b)\w+|request_body\w*|http_flwr\w*)")

# deploy/README.md, "Differential privacy": DP is each site's [privacy] dp-epsilon, applied by
# client/dp.py; a [dp] table anywhere is read by no code, so it could only claim what is not applied.
DP_TABLE_NOT_READ = ("[dp] table: no code reads it, so it would claim a protection nothing applies; DP is each "
                     "site's choice, [privacy] dp-epsilon / dp-delta / dp-clip-norm in sites/<name>/bundle.toml "
                     "(applied by the ClientApp, client/dp.py); remove this table")


@dataclass(frozen=True, order=True)
class Finding:
    path: str
    problem: str
    # a warning is printed but does not fail the check (e.g. a k below the study default that the
    # ClientApp still accepts): the privacy officer reads what it allows and decides
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {'warning: ' if self.warning else ''}{self.problem}"


@dataclass
class Command:
    """One Flower process as a config file would start it."""

    source: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # the only paths the process may write, when its sandbox says so (systemd ProtectSystem=strict,
    # compose read_only); None when the file does not restrict writes
    writable: list[str] | None = None
    # systemd: every directive of the unit (name -> values, in order); compose: the service and its file
    settings: dict[str, list[str]] | None = None
    service: dict | None = None
    compose: dict | None = None

    @property
    def program(self) -> str:
        if len(self.argv) >= 3 and Path(self.argv[0]).name == "slmfed" and self.argv[1:3] == ["site", "launcher"]:
            return LAUNCHER
        return Path(self.argv[0]).name if self.argv else ""

    def last(self, directive: str) -> str | None:
        """A systemd directive's effective value (the last one set), None when unset."""
        values = (self.settings or {}).get(directive)
        return values[-1] if values else None

    def paths(self, directive: str) -> list[str]:
        return [t.lstrip("-+") for v in (self.settings or {}).get(directive, []) for t in shlex.split(v)]

    def flag(self, name: str) -> str | None:
        """The value of `--name VALUE` / `--name=VALUE`; '' for a bare flag; None when absent."""
        for i, tok in enumerate(self.argv):
            if tok == name:
                nxt = self.argv[i + 1] if i + 1 < len(self.argv) else ""
                return "" if nxt.startswith("--") else nxt
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
        return None


# ---------------------------------------------------------------- reading config files

def _text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_SCAN_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def systemd_settings(text: str) -> dict[str, list[str]]:
    """Every `Directive=value` of a unit or drop-in, continuation lines joined; an empty value resets
    the list (as systemd does for ExecStart= and the path lists)."""
    out: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if value == "":
            out[key] = []
        else:
            out.setdefault(key, []).append(value)
    return out


def _systemd_commands(path: Path, text: str) -> Iterator[Command]:
    settings = systemd_settings(text)
    env: dict[str, str] = {}
    for value in settings.get("Environment", []):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = v
    strict = (settings.get("ProtectSystem") or [""])[-1] == "strict"
    rw = [p.lstrip("-+") for v in settings.get("ReadWritePaths", []) for p in shlex.split(v)]
    for value in settings.get("ExecStart", []):
        try:
            argv = shlex.split(value.lstrip("-@+!:"))
        except ValueError:
            argv = [value]
        yield Command(path, argv, env, writable=rw if strict else None, settings=settings)


def _compose_writable(svc: dict) -> list[str] | None:
    """Targets of a read-only container's writable mounts (volumes without :ro, tmpfs)."""
    if svc.get("read_only") is not True:
        return None
    out: list[str] = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            if vol.get("target") and not vol.get("read_only"):
                out.append(str(vol["target"]))
            continue
        parts = str(vol).split(":")
        target = parts[1] if len(parts) > 1 else parts[0]
        if len(parts) > 2 and "ro" in parts[2].split(","):
            continue
        out.append(target)
    tmpfs = svc.get("tmpfs") or []
    out += [str(t).split(":")[0] for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)]
    return out


def _compose_commands(path: Path, text: str) -> Iterator[Command]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML ({str(exc).splitlines()[0]})") from None
    services = (doc or {}).get("services") if isinstance(doc, dict) else None
    for svc in (services or {}).values():
        if not isinstance(svc, dict):
            continue
        argv: list[str] = []
        for key in ("entrypoint", "command"):
            part = svc.get(key)
            argv += shlex.split(part) if isinstance(part, str) else [str(t) for t in (part or [])]
        raw_env = svc.get("environment") or {}
        env = ({str(k): str(v) for k, v in raw_env.items()} if isinstance(raw_env, dict)
               else dict(str(e).partition("=")[::2] for e in raw_env))
        if argv:
            yield Command(path, argv, env, writable=_compose_writable(svc), service=svc, compose=doc)


def _shell_commands(path: Path, text: str) -> Iterator[Command]:
    env: dict[str, str] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(?:export\s+)?([A-Z_][A-Z0-9_]*)=(\S*)$", line)
        if m:
            env[m.group(1)] = m.group(2).strip("'\"")
            continue
        try:
            argv = shlex.split(line)
        except ValueError:
            continue
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value cmd ...
            k, _, v = argv.pop(0).partition("=")
            env[k] = v
        if argv and argv[0] == "exec":
            argv = argv[1:]
        if argv and Command(path, argv).program in REVIEWED:
            yield Command(path, argv, dict(env))


def is_systemd(path: Path) -> bool:
    """A unit file, or a drop-in (`NAME.service.d/*.conf`) that changes one."""
    return path.suffix == ".service" or (path.suffix == ".conf" and path.parent.name.endswith(".service.d"))


def all_commands(path: Path, text: str) -> list[Command]:
    """Every command a systemd unit / drop-in, compose file or shell script starts (any program).
    A drop-in is read on top of its unit (when the unit is beside its .d folder), as systemd does."""
    if is_systemd(path):
        base = path.parent.parent / path.parent.name[:-2] if path.suffix == ".conf" else None
        if base is not None and base.is_file():
            text = (_text(base) or "") + "\n" + text
        return list(_systemd_commands(path, text))
    if path.suffix in (".yaml", ".yml"):
        return list(_compose_commands(path, text))
    if path.suffix == ".sh":
        return list(_shell_commands(path, text))
    return []


def collect_commands(path: Path, text: str) -> list[Command]:
    """The Flower processes and site launchers a file starts: what `deploy check` reviews."""
    return [c for c in all_commands(path, text) if c.program in REVIEWED]


def _active_lines(text: str) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("#"):
            yield n, line


# ---------------------------------------------------------------- the checker

class Checker:
    def __init__(self, root: Path, now: dt.datetime | None = None, nginx_dir: Path | None = None):
        self.root = Path(root)
        self.now = now or dt.datetime.now(dt.timezone.utc)
        # the host's nginx configuration, looked at when an installed coordinator bundle is checked
        self.nginx_dir = Path(nginx_dir) if nginx_dir is not None else Path("/etc/nginx")
        self.findings: set[Finding] = set()
        self.coordinators: list[B.Bundle] = []
        self.sites: list[B.Bundle] = []
        self.server_certs: list[tuple[Path, x509.Certificate]] = []
        self.commands: list[Command] = []

    def add(self, path: Path | str, problem: str) -> None:
        self.findings.add(Finding(str(path), problem))

    def warn(self, path: Path | str, problem: str) -> None:
        self.findings.add(Finding(str(path), problem, warning=True))

    def resolve(self, cmd: Command, value: str) -> Path:
        """A path from a config line, mapped into the bundle folder the config came from."""
        bundle = B.find_bundle(cmd.source, stop=self.root)
        if bundle is not None:
            return bundle.local(value)
        p = Path(value)
        return p if p.is_absolute() else cmd.source.parent / p

    # --- files
    def files(self) -> list[Path]:
        if self.root.is_file():
            return [self.root]
        return sorted(p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())

    def check_private_key_mode(self, path: Path) -> None:
        try:
            with path.open("rb") as fh:
                head = fh.read(4096)
        except OSError:
            return
        if b"PRIVATE KEY-----" not in head:
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            who = "everyone" if mode & 0o004 else "its group"
            self.add(path, f"private key is readable by {who} (mode {mode:04o}); expected 0600 (chmod 600 it)")

    def check_text(self, path: Path, text: str) -> None:
        for n, line in _active_lines(text):
            if re.search(r"(?<![\w-])--insecure\b", line):
                self.add(path, f"line {n}: --insecure turns TLS off; remove it")
        if path.suffix == ".toml":
            self.check_toml(path, text)

    def check_toml(self, path: Path, text: str) -> None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.add(path, f"not valid TOML ({exc})")
            return
        links = doc.get("superlink") if path.name != B.BUNDLE_FILE else None
        if isinstance(links, dict):  # a Flower connection file ($FLWR_HOME/config.toml)
            for name, conn in links.items():
                if not isinstance(conn, dict) or "address" not in conn:
                    continue
                if conn.get("insecure") is True:
                    self.add(path, f"[superlink.{name}] insecure = true turns TLS off; remove it")
                elif not conn.get("root-certificates"):
                    self.add(path, f"[superlink.{name}] has no root-certificates; TLS would trust any system CA")
                else:
                    cmd = Command(path, ["flwr"])
                    self.check_ca_file(path, self.resolve(cmd, conn["root-certificates"]), f"[superlink.{name}] root-certificates")
                    self.check_host(path, str(conn["address"]), f"[superlink.{name}] address")

    # --- certificates
    def _validity(self, path: Path, cert: x509.Certificate, what: str) -> bool:
        if cert.not_valid_after_utc < self.now:
            self.add(path, f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}; re-issue it (slmfed deploy init --force, or rotate)")
            return False
        if cert.not_valid_before_utc > self.now:
            self.add(path, f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
            return False
        return True

    def load_cert(self, ref: Path, file: Path, what: str) -> x509.Certificate | None:
        if not file.is_file():
            self.add(ref, f"{what}: TLS file {file} is missing")
            return None
        try:
            cert = pki.load_cert(file)
        except pki.PKIError as exc:
            self.add(ref, f"{what}: {exc}")
            return None
        return cert if self._validity(file, cert, what) else None

    def check_ca_file(self, ref: Path, file: Path, what: str) -> x509.Certificate | None:
        ca = self.load_cert(ref, file, what)
        if ca is not None and self.server_certs:
            if not any(pki.issued_by(c, ca) for _, c in self.server_certs):
                self.add(ref, f"{what}: {file} did not sign the SuperLink certificate; TLS connections will fail")
        return ca

    def check_host(self, ref: Path, address: str, what: str) -> None:
        host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
        for cert_path, cert in self.server_certs:
            names = [n.lower() for n in pki.san_hosts(cert)]
            if host.lower() not in names:
                self.add(ref, f"{what}: host {host!r} is not in the SuperLink certificate {cert_path} "
                              f"(valid for {', '.join(names) or 'no names'}); TLS will reject it")

    # --- commands
    def check_runtime_deps(self, cmd: Command, default_on: bool) -> None:
        if cmd.flag("--allow-runtime-dependency-installation") is not None:
            self.add(cmd.source, f"{cmd.program}: --allow-runtime-dependency-installation lets pushed apps install packages; remove it")
        elif default_on and cmd.flag("--disable-runtime-dependency-installation") is None \
                and cmd.env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") != "1":
            self.add(cmd.source, f"{cmd.program}: runtime dependency installation is on; "
                                 "add --disable-runtime-dependency-installation")

    def check_superlink(self, cmd: Command) -> None:
        self.check_listen(cmd, "--host", "its Control API (register nodes, submit runs; no user authentication) "
                                         "and Runtime API; sites reach the Fleet API through the front door (nginx)")
        if cmd.flag("--enable-supernode-auth") is None:
            self.add(cmd.source, "flower-superlink: SuperNode authentication is off; add --enable-supernode-auth")
        if cmd.flag("--isolation") == "process":
            secret = cmd.flag("--superexec-auth-secret-file")
            if not secret:
                self.add(cmd.source, "flower-superlink: --isolation process without --superexec-auth-secret-file: "
                                     "any local process could take the ServerApp's tasks from the SuperLink's "
                                     "Runtime API (run ids, the study's messages); pass a 0600 secret file shared "
                                     "with its flower-superexec, or drop --isolation process")
            else:
                path = self.resolve(cmd, secret)
                if not path.is_file() or path.stat().st_size == 0:
                    self.add(cmd.source, f"--superexec-auth-secret-file: {path} is missing or empty")
                elif stat.S_IMODE(path.stat().st_mode) & 0o077:
                    self.add(path, f"SuperExec secret is readable by others (mode "
                                   f"{stat.S_IMODE(path.stat().st_mode):04o}); expected 0600 (chmod 600 it)")
        self.check_runtime_deps(cmd, default_on=True)
        if cmd.flag("--insecure") is not None:
            return  # already reported as --insecure
        files = {f: cmd.flag(f) for f in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")}
        for f, v in files.items():
            if not v:
                self.add(cmd.source, f"flower-superlink: TLS is off or incomplete; {f} is missing")
        if not all(files.values()):
            return
        ca = self.load_cert(cmd.source, self.resolve(cmd, files["--ssl-ca-certfile"]), "--ssl-ca-certfile")
        cert_file = self.resolve(cmd, files["--ssl-certfile"])
        cert = self.load_cert(cmd.source, cert_file, "--ssl-certfile")
        key_file = self.resolve(cmd, files["--ssl-keyfile"])
        key = None
        if not key_file.is_file():
            self.add(cmd.source, f"--ssl-keyfile: TLS file {key_file} is missing")
        else:
            try:
                key = pki.load_private_key(key_file)
            except pki.PKIError as exc:
                self.add(cmd.source, f"--ssl-keyfile: {exc}")
        if cert is not None and key is not None and not pki.same_public_key(cert.public_key(), key.public_key()):
            self.add(cmd.source, f"--ssl-keyfile: {key_file} does not match the certificate {cert_file}")
        if cert is not None and ca is not None and not pki.issued_by(cert, ca):
            self.add(cmd.source, f"--ssl-certfile: {cert_file} is not signed by --ssl-ca-certfile")
        if cert is not None:
            self.server_certs.append((cert_file, cert))

    def check_supernode(self, cmd: Command) -> None:
        self.check_runtime_deps(cmd, default_on=False)
        if cmd.flag("--insecure") is None:
            root = cmd.flag("--root-certificates")
            if not root:
                self.add(cmd.source, "flower-supernode: --root-certificates is missing; "
                                     "the SuperNode would trust any system CA instead of the deployment CA")
            else:
                self.check_ca_file(cmd.source, self.resolve(cmd, root), "--root-certificates")
                self.check_pinned_root(cmd, self.resolve(cmd, root))
            if cmd.flag("--superlink"):
                self.check_host(cmd.source, cmd.flag("--superlink"), "--superlink")
        self.check_isolation(cmd)
        self.check_listen(cmd, "--host", "its Runtime API (which hands out the site's tasks)")
        key_ref = cmd.flag("--auth-supernode-private-key")
        if not key_ref:
            self.add(cmd.source, "flower-supernode: SuperNode authentication is off; "
                                 "add --auth-supernode-private-key with the site's key")
        else:
            self.check_site_key(cmd, self.resolve(cmd, key_ref))
        self.check_node_config(cmd)

    def check_pinned_root(self, cmd: Command, root: Path) -> None:
        """A site's SuperNode trusts exactly its bundle's ca.crt (one CA certificate), never a system store
        or another file."""
        bundle = B.find_bundle(cmd.source, stop=self.root)
        if bundle is None or bundle.kind != "site":
            return
        own = bundle.root / B.CA_CERT
        if root.resolve() != own.resolve():
            self.add(cmd.source, f"--root-certificates {cmd.flag('--root-certificates')} is not the bundle's {B.CA_CERT} "
                                 f"({bundle.install_dir}/{B.CA_CERT}): the SuperNode would trust whatever CAs that "
                                 "file holds (a system store trusts hundreds) instead of the deployment CA alone")
            return
        text = _text(own) or ""
        n = text.count("-----BEGIN CERTIFICATE-----")
        if n > 1:
            self.add(own, f"holds {n} certificates: the SuperNode trusts every one of them; keep only the deployment "
                          "CA (its SHA-256 is [superlink] ca-sha256 in bundle.toml)")

    def check_site_key(self, cmd: Command, key_file: Path) -> None:
        if not key_file.is_file():
            self.add(cmd.source, f"--auth-supernode-private-key: {key_file} is missing")
            return
        if key_file.is_symlink():
            self.add(cmd.source, f"--auth-supernode-private-key: {key_file} is a symbolic link (to {key_file.resolve()}); "
                                 "keep the key itself in the bundle, mode 0600")
        mode = stat.S_IMODE(key_file.stat().st_mode)  # of the file the link points to, too
        if mode & 0o077:
            self.add(cmd.source, f"--auth-supernode-private-key: {key_file.resolve()} is readable by "
                                 f"{'everyone' if mode & 0o004 else 'its group'} (mode {mode:04o}); expected 0600")
        try:
            key = pki.load_private_key(key_file)
        except pki.PKIError as exc:
            self.add(cmd.source, f"--auth-supernode-private-key: {exc}")
            return
        registered = [pki.load_ssh_public(p) for c in self.coordinators
                      for p in sorted((c.root / B.SITE_KEYS_DIR).glob("*.pub"))]
        if self.coordinators and not any(pki.same_public_key(key.public_key(), r) for r in registered):
            self.add(cmd.source, f"--auth-supernode-private-key: {key_file} is not among the coordinator's "
                                 f"{B.SITE_KEYS_DIR}/*.pub; the SuperLink will refuse this SuperNode")

    def check_node_config(self, cmd: Command) -> None:
        raw = cmd.flag("--node-config")
        try:
            node = B.parse_node_config(raw) if raw else {}
        except (B.BundleError, ValueError) as exc:
            self.add(cmd.source, f"--node-config: {exc}")
            return
        for key in node:
            if key not in SCHEMA:
                self.add(cmd.source, f"--node-config {key}: unknown key; the ClientApp ignores it"
                                     + (" (SLM-Fed never sends per-patient rows)" if key == "share-patient-rows" else
                                        " (a misspelt privacy setting leaves the default in force)"))
        self.check_node_policy(cmd, node)
        self.check_node_signing(cmd, node)
        cache = node.get("cache-dir")
        if not cache:
            self.add(cmd.source, "--node-config: cache-dir is missing; the ClientApp needs the prepared cache")
            return
        problem = raw_dicom_problem(Path(cache))
        if problem:
            self.add(cmd.source, f"--node-config cache-dir={cache}: {problem}")
        self.check_study_dir(cmd, node, cache, sandbox=self.app_sandbox(cmd))
        self.check_cache_read_only(cmd, cache)

    def check_node_signing(self, cmd: Command, node: dict[str, str]) -> None:
        """signing-key / peer-roster in the node config: the bundle's own files, never simulation keys,
        readable in the ClientApp's sandbox."""
        bundle = B.find_bundle(cmd.source, stop=self.root)
        sandbox = self.app_sandbox(cmd)
        if node.get("model-verification") == "off":
            self.add(cmd.source, "--node-config model-verification=off: the ClientApp would compute on any model the "
                                 "coordinator sends; a real site must verify every model it computes on")
        for key, name, what in (("signing-key", B.SIGNING_KEY, "the ClientApp could not sign this site's "
                                 "contributions, and its peers would refuse them"),
                                ("peer-roster", B.PEER_ROSTER, "the ClientApp would have no sites whose "
                                 "contributions it accepts (model verification)")):
            value = node.get(key)
            if not value:
                self.add(cmd.source, f"--node-config {key} is missing: {what}; pass the bundle's {name}")
                continue
            if value.startswith(signing.SIMULATION):
                self.add(cmd.source, f"--node-config {key}={value}: a simulation key (derived from the site names, "
                                     "so anyone can sign as any site) in a real deployment; pass the bundle's "
                                     f"{name} (slmfed deploy init writes it)")
                continue
            path = self.resolve(cmd, value)
            if bundle is not None and bundle.kind == "site" and path.resolve() != (bundle.root / name).resolve():
                self.add(cmd.source, f"--node-config {key}={value} is not the bundle's {name} "
                                     f"({bundle.install_dir}/{name}); deploy check reviews only that file")
            elif not path.is_file():
                self.add(cmd.source, f"--node-config {key}={value}: {path} is missing; {what}")
            hidden = self._hidden_from(sandbox, PurePosixPath(value))
            if hidden:
                self.add(sandbox.source, f"{hidden}: the ClientApp cannot read {value} (--node-config {key}); {what}")

    @staticmethod
    def _hidden_from(sandbox: Command, target: PurePosixPath) -> str | None:
        """Why the ClientApp's sandbox cannot read `target` (a path as installed), or None."""
        if sandbox.settings is not None:
            for h in sandbox.paths("InaccessiblePaths"):
                if target == PurePosixPath(h) or PurePosixPath(h) in target.parents:
                    return f"InaccessiblePaths hides {h}"
        if sandbox.service is not None:
            targets = [PurePosixPath(d) for _s, d, _ro in map(_volume, sandbox.service.get("volumes") or []) if d]
            if not any(target == t or t in target.parents for t in targets):
                return "the launcher container mounts no volume with it"
        return None

    def check_study_dir(self, cmd: Command, node: dict[str, str], cache: str, sandbox: Command | None = None) -> None:
        """The ClientApp must be able to write its study folder (predictions, disclosure ledger); it runs in
        `sandbox` (the site launcher's, with --isolation process)."""
        writable = (sandbox or cmd).writable
        if writable is None:
            return
        cache_path = PurePosixPath(cache)
        wanted = [("study-dir", node.get("study-dir") or str(cache_path.parent / f"{cache_path.name}-study"))]
        if node.get("privacy-ledger"):
            wanted.append(("privacy-ledger", node["privacy-ledger"]))
        roots = [PurePosixPath(w) for w in writable if w]
        for key, value in wanted:
            target = PurePosixPath(value)
            if any(target == r or r in target.parents for r in roots):
                continue
            how = (f"--node-config {key}={value}" if key in node else
                   f"--node-config has no study-dir, so the ClientApp uses {value}, which")
            self.add(cmd.source, f"{how} is not writable in this sandbox "
                                 f"(writable: {', '.join(map(str, roots)) or 'nothing'}); the ClientApp could not "
                                 "keep its per-patient predictions or its disclosure ledger; "
                                 "pass the study folder the sandbox makes writable")

    def check_node_policy(self, cmd: Command, node: dict[str, str]) -> None:
        """The privacy values the SuperNode passes: valid, and exactly the site bundle's [privacy]."""
        given = {k: v for k, v in node.items() if k in SITE_POLICY_KEYS}
        problems = B.privacy_problems(given, "--node-config")
        for problem in problems:
            self.add(cmd.source, problem)
        bundle = B.find_bundle(cmd.source, stop=self.root)
        if problems or bundle is None or bundle.kind != "site":
            return
        privacy = bundle.data.get("privacy")
        if not isinstance(privacy, dict) or B.privacy_problems(privacy):
            return  # reported on the bundle itself
        policy, passed = B.policy_values(privacy), B.policy_values(given)
        for key in SITE_POLICY_KEYS:
            if policy[key] != passed[key]:
                self.add(cmd.source, f"--node-config {key}={_toml_value(passed[key])} differs from the site's privacy "
                                     f"policy ({bundle.root / B.BUNDLE_FILE} [privacy] {key} = "
                                     f"{_toml_value(policy[key])}); the site's privacy officer sets it there; "
                                     "regenerate this file from the bundle")

    # --- least privilege, reviewability (issue 9)
    def check_listen(self, cmd: Command, flag: str, what: str) -> None:
        """A SuperLink / SuperNode port (and any health port) on the loopback only, except inside a
        container that publishes nothing beyond the host's loopback."""
        for f, desc in ((flag, what), ("--health-server-address", "its health port")):
            value = cmd.flag(f)
            if value is None:
                continue  # Flower 1.42's default --host is 127.0.0.1; no health server unless asked for
            host = value.rsplit(":", 1)[0].strip("[]") if f != flag else value
            if host in LOOPBACK or host.startswith("127."):
                continue
            if cmd.service is not None and self._compose_contained(cmd):
                continue  # inside its container, reachable only on the compose networks
            self.add(cmd.source, f"{cmd.program}: {f} {value} exposes {desc} beyond this host; "
                                 "listen on 127.0.0.1")

    def _compose_contained(self, cmd: Command) -> bool:
        svc = cmd.service or {}
        if svc.get("network_mode") == "host":
            return False
        for port in svc.get("ports") or []:
            text = str(port.get("host_ip", "")) if isinstance(port, dict) else str(port)
            if not (text.startswith("127.0.0.1:") or text == "127.0.0.1"):
                return False
        return True

    def check_isolation(self, cmd: Command) -> None:
        iso = cmd.flag("--isolation") or "subprocess"
        if iso != "process":
            self.add(cmd.source, f"flower-supernode: --isolation {iso} starts every app the coordinator sends "
                                 "(flower-superexec checks nothing); use --isolation process with the site's "
                                 "launcher (slmfed site launcher), which runs only approved apps")
            return
        secret = cmd.flag("--superexec-auth-secret-file")
        if not secret:
            self.add(cmd.source, "flower-supernode: --isolation process without --superexec-auth-secret-file: "
                                 "any local process could take the site's tasks from the Runtime API; "
                                 f"pass the bundle's {B.SUPEREXEC_SECRET}")
            return
        path = self.resolve(cmd, secret)
        if not path.is_file() or path.stat().st_size == 0:
            self.add(cmd.source, f"--superexec-auth-secret-file: {path} is missing or empty")
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            self.add(path, f"SuperExec secret is readable by {'everyone' if mode & 0o004 else 'its group'} "
                           f"(mode {mode:04o}); expected 0600 (chmod 600 it)")

    def app_sandbox(self, cmd: Command) -> Command:
        """Where the ClientApp runs: with --isolation process, in the site launcher's sandbox (the launcher
        unit beside the SuperNode unit, or the launcher service of the same compose file)."""
        if cmd.flag("--isolation") != "process":
            return cmd
        for other in self.commands:
            if other.program != LAUNCHER:
                continue
            same = (other.source == cmd.source if cmd.service is not None else
                    cmd.settings is not None and other.settings is not None and other.source.parent == cmd.source.parent)
            if same:
                return other
        return Command(cmd.source, [], writable=None)

    def check_cache_read_only(self, cmd: Command, cache: str) -> None:
        target = PurePosixPath(cache)
        for sandbox in {id(c): c for c in (cmd, self.app_sandbox(cmd))}.values():
            if sandbox.settings is not None:
                rw = [PurePosixPath(p) for p in sandbox.paths("ReadWritePaths")]
                if any(target == r or r in target.parents or target in r.parents for r in rw):
                    self.add(sandbox.source, f"ReadWritePaths makes the cache {cache} writable; the ClientApp must "
                                             "only read it (ReadOnlyPaths)")
            if sandbox.service is not None:
                for vol in sandbox.service.get("volumes") or []:
                    src, dst, ro = _volume(vol)
                    if dst and PurePosixPath(dst) == target and not ro:
                        self.add(sandbox.source, f"the cache volume {src}:{dst} is mounted read-write; add :ro")

    def check_unit(self, cmd: Command) -> None:
        """A systemd unit (or drop-in) that starts a reviewed program: sandboxed, not root, reviewable."""
        if cmd.settings is None:
            return
        src = cmd.source
        user = cmd.last("User")
        if user in (None, "root", "0"):
            self.add(src, f"{cmd.program} runs as root (User={user or 'unset'}); run it as its own unprivileged user")
        if (cmd.last("NoNewPrivileges") or "").lower() not in ("yes", "true", "1", "on"):
            self.add(src, f"NoNewPrivileges={cmd.last('NoNewPrivileges') or 'unset'}: set NoNewPrivileges=yes")
        if cmd.last("ProtectSystem") != "strict":
            self.add(src, f"ProtectSystem={cmd.last('ProtectSystem') or 'unset'}: set ProtectSystem=strict "
                          "(the file system read-only except ReadWritePaths)")
        umask = cmd.last("UMask")
        try:
            masked = int(umask, 8) if umask else 0o022  # systemd's default
        except ValueError:
            masked = 0
        if masked & 0o077 != 0o077:
            self.add(src, f"UMask={umask or 'unset (systemd default 0022)'}: files {cmd.program} writes (the "
                          "SuperLink's state, a site's per-patient predictions and disclosure ledger) would be "
                          "readable by other users; set UMask=0077")
        for value in cmd.settings.get("EnvironmentFile", []):
            self.add(src, f"EnvironmentFile={value}: the environment (and any $VARIABLE in ExecStart) would come "
                          "from a file deploy check does not review; put the settings in the unit")
        for value in cmd.settings.get("ExecStart", []):
            if re.search(r"\$\{?[A-Za-z_]", value):
                self.add(src, f"ExecStart expands environment variables ({value.split()[0]} ... $...): flags could "
                              "arrive from outside the unit (e.g. --insecure); write every flag in the unit")
        if cmd.program == LAUNCHER:
            self.check_launcher_unit(cmd)

    def check_launcher_unit(self, cmd: Command) -> None:
        src = cmd.source
        bundle = B.find_bundle(src, stop=self.root)
        inst = bundle.install_dir if bundle else B.DEFAULT_INSTALL_DIR
        node_users = {c.last("User") for c in self.commands if c.program == "flower-supernode"
                      and c.settings is not None and c.source.parent == src.parent}
        if cmd.last("User") in node_users:
            self.add(src, f"the launcher runs the ClientApp as the SuperNode's user ({cmd.last('User')}): "
                          f"the app could read the SuperNode's key; use its own user ({B.APP_USER})")
        hidden = [PurePosixPath(p) for p in cmd.paths("InaccessiblePaths")]
        key = PurePosixPath(inst) / B.SITE_KEY
        if not any(key == h or h in key.parents for h in hidden):
            self.add(src, f"InaccessiblePaths does not hide the SuperNode's key {key} from the ClientApp")
        deny = " ".join(cmd.settings.get("IPAddressDeny", [])).split()
        allow = " ".join(cmd.settings.get("IPAddressAllow", [])).split()
        if "any" not in deny:
            self.add(src, "IPAddressDeny=any is missing: the ClientApp could send data anywhere; "
                          "allow only its SuperNode on loopback (IPAddressAllow=localhost)")
        wide = [a for a in allow if a not in ("localhost", "127.0.0.1", "::1", "127.0.0.0/8", "::1/128", "127.0.0.1/32")]
        if wide:
            self.add(src, f"IPAddressAllow={' '.join(wide)}: the ClientApp may reach only its SuperNode (localhost)")

    def check_service(self, cmd: Command) -> None:
        """A compose service that starts a reviewed program: no privileges, no host network."""
        svc, src = cmd.service, cmd.source
        if svc is None:
            return
        if svc.get("privileged") is True:
            self.add(src, f"{cmd.program}: privileged: true gives the container every capability and the host's "
                          "devices; remove it")
        if svc.get("network_mode") == "host":
            self.add(src, f"{cmd.program}: network_mode: host puts the container on the host's network "
                          "(its ports on every interface, no internal network); remove it")
        drop = svc.get("cap_drop") or []
        if "ALL" not in [str(c).upper() for c in drop]:
            self.add(src, f"{cmd.program}: cap_drop: [ALL] is missing; the container keeps Linux capabilities")
        if str(svc.get("user", "")).split(":")[0] in ("root", "0"):
            self.add(src, f"{cmd.program}: user: {svc['user']} runs it as root; use the image's unprivileged user")
        if not any("no-new-privileges" in str(o) for o in svc.get("security_opt") or []):
            self.add(src, f"{cmd.program}: security_opt no-new-privileges:true is missing")
        if cmd.program == LAUNCHER:
            nets = svc.get("networks") or ["default"]
            names = list(nets) if isinstance(nets, (list, dict)) else [nets]
            declared = (cmd.compose or {}).get("networks") or {}
            for n in names:
                if not (isinstance(declared.get(n), dict) and declared[n].get("internal") is True):
                    self.add(src, f"launcher: network {n!r} is not internal: the ClientApp could send data anywhere; "
                                  "keep it on an `internal: true` network with its SuperNode only")
            for vol in svc.get("volumes") or []:
                s_, _d, _ro = _volume(vol)
                if s_ in (".", "./") or (s_ or "").endswith(B.SITE_KEY):
                    self.add(src, f"launcher: volume {s_} gives the ClientApp the SuperNode's key; mount only "
                                  f"{B.APPROVED_APPS}, {B.SUPEREXEC_SECRET}, the cache and the study volume")

    def check_unreviewed(self, cmd: Command) -> None:
        """A unit / service that starts something else than the reviewed programs directly."""
        if cmd.settings is None and cmd.service is None:
            return
        prog = Path(cmd.argv[0]).name if cmd.argv else "(nothing)"
        self.add(cmd.source, f"starts {prog!r}, not flower-superlink / flower-supernode / slmfed site launcher "
                             "directly: a wrapper script or a shell (sh -c) can add or drop any flag; "
                             "deploy check can review only the program started directly")

    # --- bundles: what each holds
    def check_key_placement(self, path: Path) -> None:
        try:
            with path.open("rb") as fh:
                head = fh.read(4096)
        except OSError:
            return
        if b"PRIVATE KEY-----" not in head:
            return
        bundle = B.find_bundle(path, stop=self.root)
        if bundle is None:
            return
        is_ca = False
        ca_file = bundle.root / (B.CA_CERT if bundle.kind == "site" else B.COORD_CA)
        try:
            is_ca = pki.same_public_key(pki.load_private_key(path).public_key(), pki.load_cert(ca_file).public_key())
        except pki.PKIError:
            pass
        if is_ca:
            self.add(path, f"the CA's private key (it matches {ca_file.name}) is in the {bundle.kind} bundle: whoever "
                           "holds it can issue a SuperLink certificate every site trusts; keep it offline, delete this copy")
        elif bundle.kind == "site" and path.name not in (B.SITE_KEY, B.SIGNING_KEY):
            self.add(path, f"a private key other than the site's own ({B.SITE_KEY}, {B.SIGNING_KEY}) does not belong "
                           "in a site bundle; delete it")
        elif bundle.kind == "coordinator" and _is_signing_key(path):
            self.add(path, "a site's signing key (Ed25519) in the coordinator bundle: whoever holds it can sign "
                           "contributions as that site, which its peers accept; it belongs only in that site's "
                           "bundle; delete this copy")

    def check_registration(self, bundle: B.Bundle) -> None:
        """register-sites.sh and site-keys/: exactly the sites the bundle names."""
        names = bundle.data.get("sites", {}).get("names", [])
        keys = {(bundle.root / B.SITE_KEYS_DIR / f"{n}.pub").resolve() for n in names}
        for pub in sorted((bundle.root / B.SITE_KEYS_DIR).glob("*.pub")):
            if pub.stem not in names:
                self.add(pub, f"a key for {pub.stem!r}, which is not a site of this deployment ([sites] names: "
                              f"{', '.join(names)}); remove it")
        for script in sorted(bundle.root.glob("*.sh")):
            text = _text(script) or ""
            for n, line in _active_lines(re.sub(r"\\\n", " ", text)):
                try:
                    argv = shlex.split(line)
                except ValueError:
                    continue
                while argv and (argv[0] in ("exec", "sudo") or re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0])):
                    argv = argv[1:]
                if len(argv) >= 4 and Path(argv[0]).name == "flwr" and argv[1:3] == ["supernode", "register"]:
                    key = Path(argv[3])
                    key = (key if key.is_absolute() else script.parent / key).resolve()
                    if key not in keys:
                        self.add(script, f"line {n}: registers {argv[3]}, which is not the key of a site in "
                                         f"[sites] names ({', '.join(names)}); an extra registered key can connect "
                                         "as a SuperNode; remove the line")

    def check_front_door(self, bundle: B.Bundle) -> None:
        """The coordinator's nginx configs: public TLS, only /v1/fleet/ forwarded, verified, to the SuperLink."""
        link = bundle.data.get("superlink", {})
        internal = f"{link.get('internal-host', B.INTERNAL_HOST)}:{link.get('internal-port', B.DEFAULT_INTERNAL_PORT)}"
        for name, upstream in ((B.FRONT_DOOR, internal),
                               (B.FRONT_DOOR_COMPOSE, f"{B.INTERNAL_NAME}:{link.get('internal-port')}")):
            path = bundle.root / name
            text = _text(path)
            if text is None:
                self.add(bundle.root, f"{name} (the nginx front door) is missing: without it the SuperLink's "
                                      "Control API would have to be public; regenerate with slmfed deploy init")
                continue
            self.check_nginx(path, text, upstream, str(link.get("port", "")))

    def check_nginx(self, path: Path, text: str, upstream: str, port: str) -> None:
        body = "\n".join(l.split("#", 1)[0] for l in text.splitlines())
        listens = re.findall(r"\blisten\s+([^;]+);", body)
        if not listens:
            self.add(path, "no listen directive")
        for value in listens:
            words = value.split()
            if "ssl" not in words:
                self.add(path, f"listen {value}: no ssl; the front door must serve TLS")
            if port and not words[0].endswith(port):
                self.add(path, f"listen {value}: not the deployment's public port {port} (bundle.toml [superlink] port)")
        fleet = False
        for loc, block in _nginx_locations(body):
            proxied = re.search(r"\bproxy_pass\s+([^;]+);", block)
            if loc.strip() == "/v1/fleet/":
                fleet = True
                want = f"https://{upstream}"
                if not proxied or proxied.group(1).strip().rstrip("/") != want:
                    self.add(path, f"location /v1/fleet/: expected proxy_pass {want} (the SuperLink), found "
                                   f"{proxied.group(1).strip() if proxied else 'none'}")
                if not re.search(r"\bproxy_ssl_verify\s+on\s*;", block):
                    self.add(path, "location /v1/fleet/: proxy_ssl_verify on is missing; nginx would forward site "
                                   "traffic to whatever answers at the upstream address")
            elif proxied or re.search(r"\b(fastcgi|uwsgi|grpc|scgi)_pass\b", block):
                self.add(path, f"location {loc.strip()}: forwards to the SuperLink; only /v1/fleet/ (the Fleet API) "
                               "may be public, /v1/control/ has no user authentication")
        if not fleet:
            self.add(path, "no location /v1/fleet/: the sites could not reach the Fleet API")
        if re.search(r"\bproxy_pass\b", re.sub(r"location\s+[^{]+\{(?:[^{}]|\{[^{}]*\})*\}", "", body)):
            self.add(path, "proxy_pass outside a location block forwards everything; only /v1/fleet/ may be public")
        self.check_nginx_limits(path, body)

    def check_nginx_limits(self, path: Path, body: str) -> None:
        """Flooding without a key: unsigned calls refused before the body is read, bodies capped at what
        Flower sends, bodies buffered, connections per client limited, no header logged."""
        sizes = re.findall(r"\bclient_max_body_size\s+([^;]+);", body)
        if not sizes:
            self.add(path, f"client_max_body_size is not set: nginx's default (1 MiB) refuses Flower's array chunks; "
                           f"set it to {B.FLEET_MAX_BODY_BYTES}")
        for value in sizes:
            n = _nginx_size(value.strip())
            if n is None or n == 0 or n > B.FLEET_MAX_BODY_BYTES:
                self.add(path, f"client_max_body_size {value.strip()}: an unauthenticated caller could stream that much "
                               f"to the SuperLink, which parses a body before it checks the node's signature; Flower "
                               f"sends at most one {B.FLEET_CHUNK_BYTES}-byte array chunk per call: set "
                               f"{B.FLEET_MAX_BODY_BYTES}")
        if re.search(r"\bproxy_request_buffering\s+off\s*;", body):
            self.add(path, "proxy_request_buffering off streams a slow upload straight to the SuperLink, holding its "
                           "connection; remove it (buffer bodies here)")
        gate = re.search(r"\bif\s*\(\s*\$slmfed_unsigned\s*\)\s*\{\s*return\s+40[013]\s*;\s*\}", body)
        if not gate or "$http_flwr_public_key" not in body or "$http_flwr_signature" not in body \
                or "$http_flwr_timestamp" not in body:
            self.add(path, "calls without the SuperNode authentication headers (flwr-public-key of a site key, "
                           "flwr-signature, flwr-timestamp) are not refused here: anyone can make the SuperLink "
                           "parse bodies; keep the generated map $slmfed_unsigned and `if ($slmfed_unsigned) "
                           "{ return 403; }`")
        if not re.search(r"\blimit_conn\s+\w+\s+\d+\s*;", body):
            self.add(path, "limit_conn is missing: one client can hold any number of connections open")
        for fmt in re.findall(r"\blog_format\s+([^;]+);", body):
            bad = sorted(set(m.group(0) for m in LOGGED_SECRETS.finditer(fmt)))
            if bad:
                self.add(path, f"log_format logs {', '.join(bad)}: request headers (Flower's signed SuperNode headers "
                               "are valid for any Fleet call for about 5 minutes) or bodies must not be written to "
                               "a log; remove them")

    def check_front_door_keys(self, bundle: B.Bundle) -> None:
        """The front door's map of site keys is exactly the deployment's site-keys/<site>.pub."""
        names = bundle.data.get("sites", {}).get("names", [])
        want = {}
        for n in names:
            try:
                want[pki.flower_public_key_b64(pki.load_ssh_public(bundle.root / B.SITE_KEYS_DIR / f"{n}.pub"))] = n
            except (pki.PKIError, OSError):
                continue
        for name in (B.FRONT_DOOR, B.FRONT_DOOR_COMPOSE):
            text = _text(bundle.root / name)
            if text is None:
                continue
            m = re.search(r"map\s+\$http_flwr_public_key\s+\$slmfed_site_key\s*\{([^}]*)\}", text)
            if m is None:
                continue  # reported by check_nginx_limits
            listed = {k: v for k, v in re.findall(r'^\s*"([^"]+)"\s+(\S+);', m.group(1), re.M)}
            for key, value in listed.items():
                if value == "1" and key not in want:
                    self.add(bundle.root / name, f"map $slmfed_site_key lets through a public key that is no "
                                                 f"{B.SITE_KEYS_DIR}/<site>.pub of [sites] names ({key[:24]}...); "
                                                 "remove the line")
            for key, site in want.items():
                if listed.get(key) != "1":
                    self.add(bundle.root / name, f"map $slmfed_site_key does not list site {site!r}: the front door "
                                                 f"refuses its SuperNode; add the line \"{key}\" 1;")

    def check_installed_nginx(self, bundle: B.Bundle) -> None:
        """On the coordinator itself (the bundle checked where it is installed): no other enabled nginx site,
        e.g. Debian's default (listen 80, plain HTTP), serves beside the front door."""
        try:
            if bundle.root.resolve() != Path(bundle.install_dir).resolve():
                return
        except OSError:
            return
        enabled = self.nginx_dir / "sites-enabled"
        if not enabled.is_dir():
            return
        for site in sorted(enabled.iterdir()):
            text = _text(site) if site.exists() else None
            body = "\n".join(l.split("#", 1)[0] for l in (text or "").splitlines())
            plain = [v for v in re.findall(r"\blisten\s+([^;]+);", body) if "ssl" not in v.split()]
            if site.name == "default" or plain:
                self.add(site, f"an enabled nginx site beside the front door ({', '.join('listen ' + v for v in plain) or 'the distribution default'}): "
                               "it serves plain HTTP on this host; remove it (sudo rm "
                               f"{site}; sudo systemctl reload nginx)")
        for conf in [self.nginx_dir / "nginx.conf", *sorted((self.nginx_dir / "conf.d").glob("*.conf"))]:
            text = _text(conf) if conf.is_file() else None
            for fmt in re.findall(r"\blog_format\s+([^;]+);", text or ""):
                bad = sorted(set(m.group(0) for m in LOGGED_SECRETS.finditer(fmt)))
                if bad:
                    self.add(conf, f"log_format logs {', '.join(bad)}: request headers or bodies must not be logged "
                                   "on the front door's host")

    def check_site_alone(self, bundle: B.Bundle) -> None:
        """What a site can check with its bundle alone: the CA is a CA, its key pair matches, the allow-list."""
        ca_file = bundle.root / B.CA_CERT
        try:
            ca = pki.load_cert(ca_file)
            basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            if not basic.ca or not pki.issued_by(ca, ca):
                self.add(ca_file, "not a self-signed CA certificate: the SuperNode pins this file as the only "
                                  "trusted root; ask the coordinator for the deployment CA")
        except (pki.PKIError, x509.ExtensionNotFound):
            self.add(ca_file, "not a CA certificate (no basic constraints); ask the coordinator for the deployment CA")
        try:
            priv = pki.load_private_key(bundle.root / B.SITE_KEY)
            if not pki.same_public_key(priv.public_key(), pki.load_ssh_public(bundle.root / B.SITE_PUB)):
                self.add(bundle.root / B.SITE_PUB, f"does not match {B.SITE_KEY}: the coordinator registered the "
                                                   "public key it got; the SuperLink will refuse this SuperNode")
        except pki.PKIError as exc:
            self.add(bundle.root, str(exc))
        allow = bundle.root / B.APPROVED_APPS
        if allow.is_dir():
            self.add(allow, "is a folder, not the allow-list (docker compose creates one when the file is missing "
                            "at `up`): remove it, then run `slmfed site approve`")
        elif allow.exists():  # none yet: nothing is approved (a new bundle ships none, so a re-copy keeps it)
            try:
                B.read_approved_apps(allow)
            except B.BundleError as exc:
                self.add(allow, str(exc).split(": ", 1)[-1])
        self.check_site_pins(bundle)
        address = str(bundle.data.get("superlink", {}).get("address", ""))
        for cmd in self.commands:
            if cmd.program == "flower-supernode" and B.find_bundle(cmd.source, stop=self.root) is not None \
                    and B.find_bundle(cmd.source, stop=self.root).root == bundle.root \
                    and cmd.flag("--superlink") not in (None, address):
                self.add(cmd.source, f"--superlink {cmd.flag('--superlink')} is not the bundle's "
                                     f"[superlink] address {address}")

    def load_site_superlink_cert(self, bundle: B.Bundle) -> None:
        """A site bundle's superlink.crt (the SuperLink's certificate, signed by the deployment CA): the names
        it carries are the addresses this site may dial, checked like the coordinator's own certificate."""
        path = bundle.root / B.SUPERLINK_CERT
        if not path.is_file():
            self.add(bundle.root, f"{B.SUPERLINK_CERT} (the SuperLink's certificate) is missing: without it this "
                                  "bundle alone cannot show that its [superlink] address is one the deployment CA "
                                  "vouches for; copy coordinator/certs/server.crt here (slmfed deploy init writes it)")
            return
        cert = self.load_cert(bundle.root / B.BUNDLE_FILE, path, B.SUPERLINK_CERT)
        if cert is None:
            return
        try:
            ca = pki.load_cert(bundle.root / B.CA_CERT)
        except pki.PKIError:
            ca = None  # reported with ca.crt
        if ca is not None and not pki.issued_by(cert, ca):
            self.add(path, f"is not signed by the bundle's {B.CA_CERT}: the certificate, the CA or both come from "
                           "another deployment")
            return
        if all(c.fingerprint(pki.hashes_sha256()) != cert.fingerprint(pki.hashes_sha256())
               for _, c in self.server_certs):
            self.server_certs.append((path, cert))

    def check_site_pins(self, bundle: B.Bundle) -> None:
        """The deployment CA pinned by fingerprint in bundle.toml ([superlink] ca-sha256) is ca.crt."""
        pin = str(bundle.data.get("superlink", {}).get("ca-sha256", "")).upper()
        path = bundle.root / B.BUNDLE_FILE
        try:
            ca = pki.load_cert(bundle.root / B.CA_CERT)
        except pki.PKIError:
            return  # reported with ca.crt
        actual = pki.fingerprint(ca)
        if not pin:
            self.add(path, f"[superlink] ca-sha256 is missing: the deployment CA is not pinned; add "
                           f"ca-sha256 = \"{actual}\" after comparing it with the coordinator's (by phone)")
        elif pin != actual:
            self.add(bundle.root / B.CA_CERT, f"SHA-256 {actual} is not the deployment CA pinned in bundle.toml "
                                              f"([superlink] ca-sha256 = {pin}): the SuperNode would trust another CA")

    def check_site_roster(self, bundle: B.Bundle) -> None:
        """The site's signing key and peer roster: present, readable, the roster lists this site with this
        key (and every other site checked alongside with its key)."""
        site = str(bundle.data.get("node", {}).get("site-name", ""))
        key_file, roster_file = bundle.root / B.SIGNING_KEY, bundle.root / B.PEER_ROSTER
        key = roster = None
        if not key_file.is_file():
            self.add(bundle.root, f"{B.SIGNING_KEY} (the site's signing key) is missing: the ClientApp could not "
                                  "sign this site's contributions, and its peers would refuse them; regenerate "
                                  "with slmfed deploy init")
        else:
            try:
                key = signing.load_private_key(str(key_file))
            except signing.SigningError as exc:
                self.add(key_file, str(exc).split(": ", 1)[-1])
            self.check_signing_key_owner(bundle, key_file)
        if not roster_file.is_file():
            self.add(bundle.root, f"{B.PEER_ROSTER} (the peer roster) is missing: the site would have no sites "
                                  "whose signed contributions it accepts (model verification); copy the "
                                  "deployment's roster (slmfed deploy init writes it into every site bundle)")
        else:
            try:
                tomllib.loads(roster_file.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError:
                return  # reported as "not valid TOML" with the other TOML files
            except (OSError, UnicodeDecodeError):
                pass  # Roster.load names it
            try:
                roster = signing.Roster.load(str(roster_file))
            except signing.SigningError as exc:
                self.add(roster_file, str(exc).split(": ", 1)[-1])
        if roster is None:
            return
        if site and site not in roster.keys:
            self.add(roster_file, f"does not list this site ({site!r}): the site would refuse its own contributions "
                                  "and its peers (who have the same roster) would refuse them too"
                                  + (f"; add \"{site}\" = \"{signing.public_b64(key)}\"" if key else ""))
        elif site and key is not None and signing.public_b64(roster.keys[site]) != signing.public_b64(key):
            self.add(roster_file, f"lists this site ({site!r}) with another public key than {B.SIGNING_KEY}'s "
                                  f"({signing.public_b64(key)}): its peers would refuse what it signs; the roster and "
                                  "the key come from different deployments")
        for other in self.sites:
            name = str(other.data.get("node", {}).get("site-name", ""))
            if other.root == bundle.root or not name or name == site:
                continue
            try:
                theirs = signing.public_b64(signing.load_private_key(str(other.root / B.SIGNING_KEY)))
            except signing.SigningError:
                continue  # reported on that bundle
            if name not in roster.keys:
                self.add(roster_file, f"does not list site {name!r} of this deployment: this site would refuse "
                                      f"{name}'s contributions; every site bundle holds the same roster")
            elif signing.public_b64(roster.keys[name]) != theirs:
                self.add(roster_file, f"lists site {name!r} with another public key than {name}'s {B.SIGNING_KEY}: "
                                      f"this site would refuse {name}'s contributions and accept whoever holds "
                                      "the listed key's private half")

    def check_signing_key_owner(self, bundle: B.Bundle, key_file: Path) -> None:
        """An installed systemd bundle (checked where it is installed, on a host with the app user): the
        ClientApp runs as B.APP_USER and reads the 0600 key, so that user must own it."""
        import pwd

        try:
            if bundle.root.resolve() != Path(bundle.install_dir).resolve():
                return  # a bundle before installation (or a compose folder, where the owner is uid 10001)
            app = pwd.getpwnam(B.APP_USER)
        except (KeyError, OSError):
            return  # no app user on this host: not a systemd installation
        owner = key_file.stat().st_uid
        if owner != app.pw_uid:
            try:
                who = pwd.getpwuid(owner).pw_name
            except KeyError:
                who = str(owner)
            self.add(key_file, f"owned by {who}, not {B.APP_USER}: the ClientApp (user {B.APP_USER}) cannot read "
                               f"its 0600 signing key; run `chown {B.APP_USER}: {key_file}`")

    # --- policy
    def check_policy(self, bundle: B.Bundle) -> None:
        """Coordinator bundle: no privacy policy and no DP settings of its own (both are the sites')."""
        path = bundle.root / B.BUNDLE_FILE
        if "dp" in bundle.data:
            self.add(path, DP_TABLE_NOT_READ)
        if "privacy" in bundle.data:
            self.add(path, "[privacy] in the coordinator bundle: the privacy policy belongs to each site "
                           "(sites/<name>/bundle.toml, passed in the SuperNode's --node-config); "
                           "the coordinator cannot set it; remove this table")

    def check_site_policy(self, bundle: B.Bundle) -> None:
        """Site bundle: [privacy] present, only known keys, each valid as the ClientApp checks it."""
        path = bundle.root / B.BUNDLE_FILE
        privacy = bundle.data.get("privacy")
        if not isinstance(privacy, dict):
            self.add(path, "[privacy] table is missing: the site's privacy policy must be stated explicitly "
                           f"({', '.join(B.DEFAULT_SITE_PRIVACY)})")
            return
        problems = B.privacy_problems(privacy)
        for problem in problems:
            self.add(path, problem)
        k = privacy.get("min-cell-size", STUDY_K)
        if not problems and isinstance(k, int) and k < STUDY_K:
            self.warn(path, f"[privacy] min-cell-size = {k} is below the study default {STUDY_K}: every statistic, "
                            f"score cell and training update this site releases may then concern as few as {k} "
                            f"patients of a class (and the batch floor, min-batch-size 0 = k, drops to {k}); "
                            "keep it only if your privacy officer accepted that")
        if "dp-epsilon" not in privacy:
            self.add(path, "[privacy] dp-epsilon is missing: state the site's DP choice explicitly (0.0 = no DP-SGD; "
                           "> 0 = the study's epsilon budget for the weights this site trains)")
        if privacy.get("span-audit") == "report":
            self.add(path, "[privacy] span-audit = report answers requests the released-group audit refuses (a "
                           "simulation's own virtual sites only): a real site enforces it, set span-audit = \"enforce\"")
        if privacy.get("model-verification") == "off":
            self.add(path, "[privacy] model-verification = off computes on any model the coordinator sends (tests "
                           "of the other rules only): a real site must verify every model it computes on, set "
                           "model-verification = \"enforce\"")
        if "dp" in bundle.data:
            self.add(path, DP_TABLE_NOT_READ)

    # --- driver
    def run(self) -> list[Finding]:
        if not self.root.exists():
            self.add(self.root, "does not exist")
            return sorted(self.findings)
        files = self.files()
        for p in files:
            if p.name == B.BUNDLE_FILE:
                try:
                    b = B.read_bundle(p.parent)
                except B.BundleError as exc:
                    self.add(p, str(exc))
                    continue
                (self.coordinators if b.kind == "coordinator" else self.sites).append(b)
        commands: list[Command] = []
        for p in files:
            self.check_private_key_mode(p)
            self.check_key_placement(p)
            text = _text(p) if p.suffix in TEXT_SUFFIXES or p.suffix == "" else None
            if text is None:
                continue
            if p.suffix != ".toml":  # TOML is checked once the SuperLink certificate is known
                self.check_text(p, text)
            try:
                found = all_commands(p, text)
            except ValueError as exc:
                self.add(p, str(exc))
                continue
            for cmd in found:
                if cmd.program in REVIEWED:
                    commands.append(cmd)
                else:
                    self.check_unreviewed(cmd)
        self.commands = commands
        for b in self.sites:
            self.load_site_superlink_cert(b)
        # SuperLinks first: their certificates are what site configs are checked against.
        for cmd in sorted(commands, key=lambda c: c.program != "flower-superlink"):
            if cmd.program == "flower-superlink":
                self.check_superlink(cmd)
            elif cmd.program == "flower-supernode":
                self.check_supernode(cmd)
            self.check_unit(cmd)
            self.check_service(cmd)
        for p in files:
            if p.suffix == ".toml" and (text := _text(p)) is not None:
                self.check_text(p, text)
        for b in self.coordinators:
            self.check_policy(b)
            self.check_registration(b)
            self.check_front_door(b)
            self.check_front_door_keys(b)
            self.check_installed_nginx(b)
            for host in b.data.get("superlink", {}).get("hosts", []):
                self.check_host(b.root / B.BUNDLE_FILE, f"{host}:0", "[superlink] hosts")
        for b in self.sites:
            self.check_site_policy(b)
            self.check_site_alone(b)
            self.check_site_roster(b)
            addr = b.data.get("superlink", {}).get("address")
            if addr:
                self.check_host(b.root / B.BUNDLE_FILE, str(addr), "[superlink] address")
        if not commands:
            self.add(self.root, "no flower-superlink / flower-supernode command found (expected systemd units, compose files or scripts)")
        return sorted(self.findings)


def _volume(vol) -> tuple[str, str, bool]:
    """(source, target, read-only) of a compose volume entry, short or long syntax."""
    if isinstance(vol, dict):
        return str(vol.get("source", "")), str(vol.get("target", "")), bool(vol.get("read_only"))
    parts = str(vol).split(":")
    if len(parts) == 1:
        return "", parts[0], False
    return parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")


def _nginx_size(value: str) -> int | None:
    """Bytes of an nginx size ("6m", "512k", "6291456"); None when it is not one."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    if m is None:
        return None
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def _nginx_locations(body: str) -> list[tuple[str, str]]:
    """(location argument, block text) for every location block (one level of nested blocks)."""
    out = []
    for m in re.finditer(r"\blocation\s+([^{]+)\{", body):
        depth, i = 1, m.end()
        while i < len(body) and depth:
            depth += {"{": 1, "}": -1}.get(body[i], 0)
            i += 1
        out.append((m.group(1), body[m.end():i - 1]))
    return out


def _is_signing_key(path: Path) -> bool:
    """An Ed25519 private key (what common.signing writes), whatever the file is called."""
    try:
        signing.load_private_key(str(path))
    except signing.SigningError:
        return False
    return True


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def raw_dicom_problem(cache: Path, scan_limit: int = 200) -> str | None:
    """Why `cache` is not a prepared cache but raw input, or None when it looks right."""
    if not cache.exists():
        parts = [p.lower() for p in cache.parts]
        if "dicom" in parts or cache.suffix.lower() == ".dcm":
            return "points at raw DICOM; expected the prepared cache (output of `slmfed prepare`)"
        return None  # a path on the site's machine; `slmfed site join` checks it there
    if (cache / "dicom").is_dir() or (cache / "clinical.csv").is_file():
        return "points at a raw site folder (dicom/, clinical.csv); expected the prepared cache (output of `slmfed prepare`)"
    if (cache / "manifest.json").is_file():
        return None
    for n, p in enumerate(cache.rglob("*")):
        if n >= scan_limit:
            break
        if p.is_file() and _is_dicom(p):
            return f"points at raw DICOM ({p.name}); expected the prepared cache (output of `slmfed prepare`)"
    return "is not a prepared cache (no manifest.json); run `slmfed prepare` first"


def check_deployment(root: str | Path, now: dt.datetime | None = None,
                     nginx_dir: str | Path | None = None) -> list[Finding]:
    """All findings for a deployment folder (init output, one bundle, or one file); warnings included
    (Finding.warning), which do not fail the check."""
    return Checker(Path(root), now=now, nginx_dir=nginx_dir).run()


def pinned_ca_notes(root: str | Path) -> list[str]:
    """One line per site bundle under `root`: the deployment CA's SHA-256, to compare by phone with the
    coordinator's (what no file in a bundle can prove by itself)."""
    root = Path(root)
    files = [root / B.BUNDLE_FILE] if root.is_dir() and (root / B.BUNDLE_FILE).is_file() else \
        (sorted(root.rglob(B.BUNDLE_FILE)) if root.is_dir() else [])
    out = []
    for f in files:
        try:
            b = B.read_bundle(f.parent)
            if b.kind == "site":
                fp = pki.fingerprint(pki.load_cert(b.root / B.CA_CERT))
                out.append(f"{b.root / B.CA_CERT}: note: this site trusts only the CA with SHA-256 {fp}; "
                           "compare it with the coordinator's fingerprint over another channel (phone)")
        except (B.BundleError, pki.PKIError):
            continue
    return out
