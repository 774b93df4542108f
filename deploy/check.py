"""`slmfed deploy check DIR`: lint the deployment files a privacy officer reviews.

Why: a deployment is safe only if every command line keeps TLS, SuperNode authentication and
runtime dependency installation the way `deploy init` generated them, and if every private key
stays private. The checker reads what will actually run (systemd ExecStart lines, compose
commands, shell scripts, Flower connection files, bundle.toml) and reports one line per finding,
"path: problem". It passes on what `deploy init` generates.

Privacy settings: each site's bundle.toml holds the site's privacy policy ([privacy], validated as
the ClientApp validates its node config), and every SuperNode command must pass exactly that
policy in --node-config; the coordinator bundle holds no [privacy] (it cannot set it) and a [dp]
table that says DP is off, because no code in SLM-Fed applies DP.
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

from common.config import SCHEMA, SITE_POLICY_KEYS
from deploy import bundle as B
from deploy import pki

TEXT_SUFFIXES = {".service", ".yaml", ".yml", ".sh", ".toml", ".env", ".conf", ".cfg", ".ini"}
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode")
MAX_SCAN_BYTES = 1 << 20

# deploy/README.md, "Site privacy policy": DP is not implemented, so [dp] may only say it is off.
DP_KEYS = ("enabled", "clipping-norm", "noise-multiplier")
DP_NOT_IMPLEMENTED = "DP is not implemented in SLM-Fed: no code applies it; a config must not claim it"


@dataclass(frozen=True, order=True)
class Finding:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Command:
    """One Flower process as a config file would start it."""

    source: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # the only paths the process may write, when its sandbox says so (systemd ProtectSystem=strict,
    # compose read_only); None when the file does not restrict writes
    writable: list[str] | None = None

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name if self.argv else ""

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


def _systemd_commands(path: Path, text: str) -> Iterator[Command]:
    joined = re.sub(r"\\\n", " ", text)
    env: dict[str, str] = {}
    execs: list[str] = []
    strict = False
    rw: list[str] = []
    for line in joined.splitlines():
        line = line.strip()
        if re.match(r"^ProtectSystem\s*=\s*strict\s*$", line):
            strict = True
        elif line.startswith("ReadWritePaths="):
            rw += [p.lstrip("-+") for p in shlex.split(line.split("=", 1)[1])]
        elif line.startswith("Environment="):
            for item in shlex.split(line.split("=", 1)[1]):
                k, _, v = item.partition("=")
                env[k] = v
        elif line.startswith("ExecStart="):
            execs.append(line.split("=", 1)[1].lstrip("-@+!:"))
    for value in execs:
        yield Command(path, shlex.split(value), env, writable=rw if strict else None)


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
            yield Command(path, argv, env, writable=_compose_writable(svc))


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
        if argv and Path(argv[0]).name in FLOWER_PROGRAMS:
            yield Command(path, argv, dict(env))


def collect_commands(path: Path, text: str) -> list[Command]:
    if path.suffix == ".service":
        cmds = list(_systemd_commands(path, text))
    elif path.suffix in (".yaml", ".yml"):
        cmds = list(_compose_commands(path, text))
    elif path.suffix == ".sh":
        cmds = list(_shell_commands(path, text))
    else:
        cmds = []
    return [c for c in cmds if c.program in FLOWER_PROGRAMS]


def _active_lines(text: str) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("#"):
            yield n, line


# ---------------------------------------------------------------- the checker

class Checker:
    def __init__(self, root: Path, now: dt.datetime | None = None):
        self.root = Path(root)
        self.now = now or dt.datetime.now(dt.timezone.utc)
        self.findings: set[Finding] = set()
        self.coordinators: list[B.Bundle] = []
        self.sites: list[B.Bundle] = []
        self.server_certs: list[tuple[Path, x509.Certificate]] = []

    def add(self, path: Path | str, problem: str) -> None:
        self.findings.add(Finding(str(path), problem))

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
        if cmd.flag("--enable-supernode-auth") is None:
            self.add(cmd.source, "flower-superlink: SuperNode authentication is off; add --enable-supernode-auth")
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
            if cmd.flag("--superlink"):
                self.check_host(cmd.source, cmd.flag("--superlink"), "--superlink")
        key_ref = cmd.flag("--auth-supernode-private-key")
        if not key_ref:
            self.add(cmd.source, "flower-supernode: SuperNode authentication is off; "
                                 "add --auth-supernode-private-key with the site's key")
        else:
            self.check_site_key(cmd, self.resolve(cmd, key_ref))
        self.check_node_config(cmd)

    def check_site_key(self, cmd: Command, key_file: Path) -> None:
        if not key_file.is_file():
            self.add(cmd.source, f"--auth-supernode-private-key: {key_file} is missing")
            return
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
        cache = node.get("cache-dir")
        if not cache:
            self.add(cmd.source, "--node-config: cache-dir is missing; the ClientApp needs the prepared cache")
            return
        problem = raw_dicom_problem(Path(cache))
        if problem:
            self.add(cmd.source, f"--node-config cache-dir={cache}: {problem}")
        self.check_study_dir(cmd, node, cache)

    def check_study_dir(self, cmd: Command, node: dict[str, str], cache: str) -> None:
        """The ClientApp must be able to write its study folder (predictions, disclosure ledger)."""
        if cmd.writable is None:
            return
        cache_path = PurePosixPath(cache)
        wanted = [("study-dir", node.get("study-dir") or str(cache_path.parent / f"{cache_path.name}-study"))]
        if node.get("privacy-ledger"):
            wanted.append(("privacy-ledger", node["privacy-ledger"]))
        roots = [PurePosixPath(w) for w in cmd.writable if w]
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

    # --- policy
    def check_policy(self, bundle: B.Bundle) -> None:
        """Coordinator bundle: DP stated as off (not implemented); no privacy policy of its own."""
        path = bundle.root / B.BUNDLE_FILE
        dp = bundle.data.get("dp")
        if not isinstance(dp, dict):
            self.add(path, "[dp] section is missing; state explicitly that DP is off (enabled = false)")
        else:
            for problem in dp_policy_problems(dp):
                self.add(path, problem)
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
        for problem in B.privacy_problems(privacy):
            self.add(path, problem)

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
            text = _text(p) if p.suffix in TEXT_SUFFIXES or p.suffix == "" else None
            if text is None:
                continue
            if p.suffix != ".toml":  # TOML is checked once the SuperLink certificate is known
                self.check_text(p, text)
            try:
                commands += collect_commands(p, text)
            except ValueError as exc:
                self.add(p, str(exc))
        # SuperLinks first: their certificates are what site configs are checked against.
        for cmd in sorted(commands, key=lambda c: c.program != "flower-superlink"):
            (self.check_superlink if cmd.program == "flower-superlink" else self.check_supernode)(cmd)
        for p in files:
            if p.suffix == ".toml" and (text := _text(p)) is not None:
                self.check_text(p, text)
        for b in self.coordinators:
            self.check_policy(b)
            for host in b.data.get("superlink", {}).get("hosts", []):
                self.check_host(b.root / B.BUNDLE_FILE, f"{host}:0", "[superlink] hosts")
        for b in self.sites:
            self.check_site_policy(b)
            addr = b.data.get("superlink", {}).get("address")
            if addr:
                self.check_host(b.root / B.BUNDLE_FILE, str(addr), "[superlink] address")
        if not commands:
            self.add(self.root, "no flower-superlink / flower-supernode command found (expected systemd units, compose files or scripts)")
        return sorted(self.findings)


def dp_policy_problems(dp: dict[str, Any]) -> list[str]:
    """Why a [dp] table claims more than SLM-Fed does: DP is not implemented, so it must say off."""
    enabled = dp.get("enabled")
    if not isinstance(enabled, bool):
        return [f"[dp] enabled = {enabled!r}: expected true or false (and false: {DP_NOT_IMPLEMENTED})"]
    out = []
    if enabled:
        out.append(f"[dp] enabled = true: {DP_NOT_IMPLEMENTED}; set enabled = false")
    for name in ("clipping-norm", "noise-multiplier"):
        value = dp.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out.append(f"[dp] {name} = {value!r}: expected 0")
        elif value != 0:
            out.append(f"[dp] {name} = {value}: {DP_NOT_IMPLEMENTED}, so nothing is clipped or noised; "
                       "set it to 0")
    for name in dp:
        if name not in DP_KEYS:
            out.append(f"[dp] {name}: unknown key (known: {', '.join(DP_KEYS)}); {DP_NOT_IMPLEMENTED}")
    return out


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


def check_deployment(root: str | Path, now: dt.datetime | None = None) -> list[Finding]:
    """All findings for a deployment folder (init output, one bundle, or one file)."""
    return Checker(Path(root), now=now).run()
