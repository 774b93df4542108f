"""`slmfed site join --bundle DIR --cache CACHE`: one command that starts a site's SuperNode.

Why: a site's IT person should not assemble Flower flags by hand. This checks the bundle is
complete (CA certificate, a private key only the service user can read, bundle.toml, the site's
signing key and a peer roster that lists this site with that key's public key), that CACHE
is a prepared cache and not raw DICOM, that the SuperLink's certificate verifies against the
bundle's CA (when the SuperLink is reachable), and that the bundle's [privacy] table (the site's
privacy policy) is valid, and then replaces itself with `flower-supernode` started with exactly the
flags the bundle's systemd unit and compose file use (deploy.bundle.site_argv): the same policy and
the same kind of study folder reach the ClientApp in --node-config.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import ssl
import stat
import sys
from pathlib import Path

from common import signing
from deploy import bundle as B
from deploy import pki
from deploy.check import raw_dicom_problem


class JoinError(RuntimeError):
    """The site cannot join as configured; the message says which file and what to do."""


def check_bundle(bundle: B.Bundle) -> None:
    if bundle.kind != "site":
        raise JoinError(f"{bundle.root}: this is the {bundle.kind} bundle; a site joins with its own sites/<name> bundle")
    node = bundle.data.get("node", {})
    for key in ("site-name",):
        if not node.get(key):
            raise JoinError(f"{bundle.root / B.BUNDLE_FILE}: [node] {key} is missing")
    if not bundle.data.get("superlink", {}).get("address"):
        raise JoinError(f"{bundle.root / B.BUNDLE_FILE}: [superlink] address is missing")
    if bundle.data.get("superlink", {}).get("insecure") or node.get("insecure"):
        raise JoinError(f"{bundle.root / B.BUNDLE_FILE}: insecure connections are not allowed; remove `insecure`")
    # the site's privacy policy reaches the ClientApp only through this command's --node-config:
    # never start a SuperNode without it, or with a policy the ClientApp would reject
    try:
        problems = B.privacy_problems(B.site_privacy(bundle))
    except B.BundleError as exc:
        raise JoinError(str(exc)) from None
    if problems:
        raise JoinError(f"{bundle.root / B.BUNDLE_FILE}: " + "; ".join(problems))
    ca_file = bundle.root / B.CA_CERT
    if not ca_file.is_file():
        raise JoinError(f"{ca_file}: the deployment CA certificate is missing from the bundle")
    try:
        ca = pki.load_cert(ca_file)
    except pki.PKIError as exc:
        raise JoinError(str(exc)) from None
    if ca.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise JoinError(f"{ca_file}: expired on {ca.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for a new bundle")
    key_file = bundle.root / B.SITE_KEY
    if not key_file.is_file():
        raise JoinError(f"{key_file}: the SuperNode private key is missing from the bundle")
    mode = stat.S_IMODE(key_file.stat().st_mode)
    if mode & 0o077:
        raise JoinError(f"{key_file}: private key is readable by others (mode {mode:04o}); run `chmod 600 {key_file}`")
    try:
        pki.load_private_key(key_file)
    except pki.PKIError as exc:
        raise JoinError(str(exc)) from None
    secret = bundle.root / B.SUPEREXEC_SECRET
    if not secret.is_file() or secret.stat().st_size == 0:
        raise JoinError(f"{secret}: the SuperExec secret (shared by the SuperNode and the launcher) is missing or empty")
    mode = stat.S_IMODE(secret.stat().st_mode)
    if mode & 0o077:
        raise JoinError(f"{secret}: readable by others (mode {mode:04o}); run `chmod 600 {secret}`")
    allow = bundle.root / B.APPROVED_APPS
    if allow.exists():  # none yet: the launcher approves nothing until `slmfed site approve` writes it
        try:
            B.read_approved_apps(allow)
        except B.BundleError as exc:
            raise JoinError(str(exc)) from None
    check_signing(bundle)


def check_signing(bundle: B.Bundle) -> None:
    """Model verification: the site's signing key (private) and a peer roster that lists this site
    with that key's public key; otherwise the ClientApp could not sign, or its peers' rosters (the
    same file) would refuse what it signs."""
    site = str(bundle.data.get("node", {}).get("site-name", ""))
    key_file = bundle.root / B.SIGNING_KEY
    if not key_file.is_file():
        raise JoinError(f"{key_file}: the site's signing key is missing from the bundle (it signs this site's "
                        "contributions; written by `slmfed deploy init`)")
    mode = stat.S_IMODE(key_file.stat().st_mode)
    if mode & 0o077:
        raise JoinError(f"{key_file}: signing key is readable by others (mode {mode:04o}); run `chmod 600 {key_file}`")
    roster_file = bundle.root / B.PEER_ROSTER
    if not roster_file.is_file():
        raise JoinError(f"{roster_file}: the peer roster (the sites whose signed contributions this site accepts) is "
                        "missing from the bundle; it is written by `slmfed deploy init`, the same file in every site "
                        "bundle")
    try:
        key = signing.load_private_key(str(key_file))
    except signing.SigningError as exc:  # "signing-key PATH: why"
        raise JoinError(f"{key_file}: {str(exc).split(': ', 1)[-1]}") from None
    try:
        roster = signing.Roster.load(str(roster_file))
    except signing.SigningError as exc:  # "peer-roster PATH: why"
        raise JoinError(f"{roster_file}: {str(exc).split(': ', 1)[-1]}") from None
    listed = roster.keys.get(site)
    if listed is None:
        raise JoinError(f"{roster_file}: does not list this site ({site!r}); its peers would refuse what it signs. "
                        f"Add the line \"{site}\" = \"{signing.public_b64(key)}\" (the public key of {key_file.name})")
    if signing.public_b64(listed) != signing.public_b64(key):
        raise JoinError(f"{roster_file}: lists site {site!r} with another public key than {key_file.name}'s "
                        f"({signing.public_b64(key)}); the roster and the key come from different deployments")


def check_cache(cache: Path) -> None:
    """A light check here; the ClientApp verifies every file's hash when it loads the cache."""
    if not cache.is_dir():
        raise JoinError(f"{cache}: the cache folder does not exist (run `slmfed prepare SITE_DIR {cache}` first)")
    problem = raw_dicom_problem(cache)
    if problem:
        raise JoinError(f"{cache}: {problem}")
    manifest = cache / "manifest.json"
    try:
        data = json.loads(manifest.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise JoinError(f"{manifest}: cannot be read as JSON ({exc}); re-run `slmfed prepare`") from None
    included = [k for k, e in (data.get("patients") or {}).items() if isinstance(e, dict) and e.get("status") == "included"]
    if not included:
        raise JoinError(f"{manifest}: the cache holds no included patient; see qc.csv beside it")


def preflight_tls(address: str, ca_file: Path, timeout: float = 5.0) -> str | None:
    """Handshake with the SuperLink using only the bundle's CA.

    Returns a warning when the SuperLink cannot be reached (the SuperNode will retry); raises
    JoinError when it answers with a certificate the CA does not vouch for, since retrying
    cannot fix that.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as exc:
        raise JoinError(
            f"the SuperLink at {address} presented a certificate that {ca_file} does not verify "
            f"({exc.verify_message}); ask the coordinator for the current bundle"
        ) from None
    except ssl.SSLError as exc:
        raise JoinError(f"TLS handshake with the SuperLink at {address} failed ({exc.reason}); "
                        "is it running with TLS on that port?") from None
    except OSError as exc:
        return f"the SuperLink at {address} is not reachable now ({exc}); the SuperNode will keep retrying"


def _program(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise JoinError(f"{name} is not installed in this environment (pip install the project first)")
    return found


def join_command(bundle_dir: str | Path, cache: str | Path, *, port: int | None = None) -> list[str]:
    """Check everything and return the flower-supernode argv (paths into the bundle folder)."""
    bundle = B.read_bundle(Path(bundle_dir).resolve())
    check_bundle(bundle)
    cache = Path(cache).resolve()
    check_cache(cache)
    return B.site_argv(bundle, cache_dir=str(cache), installed=False, port=port,
                       program=_program("flower-supernode"))


def join_env() -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # the SuperNode starts flwr-clientapp by name: this environment's bin dir first, venv activated or not
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def launcher_command(bundle_dir: str | Path, supernode_argv: list[str], *, warm: bool = True) -> list[str]:
    """`slmfed site launcher` beside the SuperNode that `join_command` starts (same bundle, same port)."""
    bundle = B.read_bundle(Path(bundle_dir).resolve())
    port = supernode_argv[supernode_argv.index("--port") + 1]
    return B.launcher_argv(supernode=f"127.0.0.1:{port}", secret=str(bundle.root / B.SUPEREXEC_SECRET),
                           approved=str(bundle.root / B.APPROVED_APPS),
                           program=_program("slmfed"), warm=warm)
