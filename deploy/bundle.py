"""Bundle layout and the one place where Flower command lines are built.

Why: the systemd units, the compose file, `slmfed site join` and the end-to-end test must start
`flower-superlink` / `flower-supernode` with exactly the same flags, so they all call
`superlink_argv` / `supernode_argv` here. A bundle is a folder with `bundle.toml` (what it is,
where it gets installed, its settings) next to the files its commands point at.
"""
from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w

from common.config import SCHEMA, SITE_POLICY_KEYS, ConfigError, load_config
from common import signing

BUNDLE_FILE = "bundle.toml"
DEFAULT_INSTALL_DIR = "/etc/slmfed"
DEFAULT_CACHE_DIR = "/srv/slmfed/cache"
DEFAULT_STATE_DIR = "/var/lib/slmfed"
DEFAULT_LOG_DIR = "/var/log/slmfed"
DEFAULT_VENV = "/opt/slmfed/.venv"
DEFAULT_SUPERLINK_PORT = 9092  # the public front door (nginx): the Fleet API only
DEFAULT_INTERNAL_PORT = 9093   # the SuperLink itself (Fleet + Control + Runtime API), coordinator loopback only
INTERNAL_HOST = "127.0.0.1"
# The name nginx verifies on the SuperLink's certificate when it forwards Fleet calls (a SAN of the
# server certificate; in the compose file also the SuperLink container's network alias).
INTERNAL_NAME = "slmfed-superlink"
DEFAULT_SUPERNODE_PORT = 9094
# A site keeps retrying for a day when the coordinator is down (maintenance windows), then
# systemd restarts it; never an unbounded loop that nobody notices.
DEFAULT_MAX_RETRIES = 500
DEFAULT_MAX_WAIT_TIME = 86400.0
# process: the SuperNode starts no app itself. The site's own launcher (`slmfed site launcher`,
# deploy/launcher.py) takes each task from the SuperNode's Runtime API, checks the app's FAB hash
# against the site's allow-list (approved-apps.toml) and only then starts the ClientApp, as another
# user, in a sandbox without the SuperNode's key and without network egress. The Runtime API's task
# hand-out is protected by a shared secret (superexec.secret) so no other local process takes tasks.
SUPERNODE_ISOLATION = "process"

# The site's privacy policy as `deploy init` writes it into each site's bundle.toml ([privacy]):
# the defaults of common/config.py. The site's privacy officer owns and edits that table; the
# SuperNode command passes it to the ClientApp in --node-config, the only place the ClientApp
# reads it from (the coordinator's run config cannot set it). The ledger path is left to its
# default, STUDY_DIR/disclosure-ledger.json.
DEFAULT_SITE_PRIVACY: dict[str, Any] = {k: SCHEMA[k].default for k in SITE_POLICY_KEYS if k != "privacy-ledger"}


def default_study_dir(cache_dir: str) -> str:
    """The site's study folder in a generated deployment: beside the cache, `<cache>/../study`.

    The systemd unit and the compose file make exactly this folder writable, and the SuperNode
    command passes it as `study-dir`, so the ClientApp writes its per-patient predictions and
    its disclosure ledger where the sandbox allows it.
    """
    return str(PurePosixPath(cache_dir).parent / "study")

# Site bundle files
CA_CERT = "ca.crt"
SUPERLINK_CERT = "superlink.crt"        # the SuperLink's certificate (public): the names the CA vouches for
SITE_KEY = "supernode.key"
SITE_PUB = "supernode.pub"
SUPEREXEC_SECRET = "superexec.secret"   # shared by the SuperNode and the site's launcher, 0600
APPROVED_APPS = "approved-apps.toml"    # the site's allow-list of app (FAB) hashes
LAUNCHER_UNIT = "slmfed-launcher.service"
APP_USER = "slmfed-app"                 # the ClientApp's user: not the SuperNode's, cannot read its key
# Model verification (common/signing.py): the site's Ed25519 key that signs its contributions, 0600 and
# owned by APP_USER (the ClientApp signs; the SuperNode never reads it), and the peer roster (the sites
# whose signed contributions this site accepts; the same file in every site bundle; public).
SIGNING_KEY = signing.SIGNING_KEY_FILE  # "study-signing.key"
PEER_ROSTER = signing.PEER_ROSTER_FILE  # "peer-roster.toml"
# Coordinator bundle files
SERVER_CERT = "certs/server.crt"
SERVER_KEY = "certs/server.key"
COORD_CA = "certs/ca.crt"
SITE_KEYS_DIR = "site-keys"
FRONT_DOOR = "nginx-slmfed.conf"        # the public front door (systemd host): exposes /v1/fleet/ only
FRONT_DOOR_COMPOSE = "nginx-slmfed-compose.conf"  # the same for the compose file's nginx container
SITE_REGISTRY = "site-registry.toml"    # which registered node (public key, node id) is which site
FRONT_DOOR_ACCESS_LOG = "/var/log/nginx/slmfed-access.log"  # systemd host; compose: the image's stdout log

# The front door's limits (deploy/templates/nginx-front-door.conf). Flower 1.42 sends one object per
# Fleet call (PushObject: one array chunk, or one message / record object); arrays are cut into chunks
# of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes (default 5 MiB, flwr/common/constant.py), whatever the
# model's size, so the largest legitimate body is one chunk plus protobuf framing. The margin covers
# the message and non-array record objects (metrics, signed statements, score cells: kilobytes).
FLEET_CHUNK_BYTES = 5 * 1024 * 1024
FLEET_BODY_MARGIN_BYTES = 1024 * 1024
FLEET_MAX_BODY_BYTES = FLEET_CHUNK_BYTES + FLEET_BODY_MARGIN_BYTES
FRONT_DOOR_CONN_PER_IP = 32     # concurrent connections per client address
FRONT_DOOR_REQ_RATE = 100       # requests per second per client address, sustained ...
FRONT_DOOR_REQ_BURST = 3000     # ... after a burst of this many (one message's objects arrive at once)


class BundleError(ValueError):
    """A bundle folder is incomplete or its bundle.toml is wrong."""


@dataclass
class Bundle:
    """A parsed bundle.toml plus the folder it sits in."""

    root: Path
    kind: str
    install_dir: str
    data: dict[str, Any] = field(default_factory=dict)

    def local(self, install_path: str | Path) -> Path:
        """Map a path as it will be on the installed machine to the file in this folder."""
        p = Path(install_path)
        try:
            return self.root / p.relative_to(self.install_dir)
        except ValueError:
            return p if p.is_absolute() else self.root / p


def read_bundle(root: str | Path) -> Bundle:
    root = Path(root)
    path = root / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"{root}: not a deployment bundle (expected {BUNDLE_FILE}, found none)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read as TOML ({exc})") from None
    kind = data.get("kind")
    if kind not in ("site", "coordinator"):
        raise BundleError(f"{path}: expected kind = \"site\" or \"coordinator\", found {kind!r}")
    return Bundle(root=root, kind=kind, install_dir=str(data.get("install-dir", DEFAULT_INSTALL_DIR)), data=data)


def find_bundle(path: Path, stop: Path | None = None) -> Bundle | None:
    """The bundle a file belongs to (nearest folder upwards with bundle.toml), if any."""
    for folder in [path if path.is_dir() else path.parent, *path.parents]:
        if (folder / BUNDLE_FILE).is_file():
            return read_bundle(folder)
        if stop is not None and folder == stop:
            break
    return None


# ---------------------------------------------------------------- command lines

def node_config_arg(values: dict[str, Any]) -> str:
    """Flower's --node-config syntax: space separated key=value, strings in double quotes."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if '"' in text or "\\" in text:
                raise BundleError(f"node-config value for {key!r} must not contain quotes or backslashes: {text!r}")
            parts.append(f'{key}="{text}"')
    return " ".join(parts)


def parse_node_config(arg: str) -> dict[str, str]:
    """Inverse of `node_config_arg` (values as text), used by the checker."""
    out: dict[str, str] = {}
    for token in shlex.split(arg):
        key, sep, value = token.partition("=")
        if not sep:
            raise BundleError(f"--node-config entry {token!r}: expected key=value")
        out[key] = value
    return out


def superlink_argv(
    *,
    ca_cert: str,
    server_cert: str,
    server_key: str,
    host: str = INTERNAL_HOST,
    port: int = DEFAULT_INTERNAL_PORT,
    database: str | None = None,
    log_file: str | None = None,
    program: str = "flower-superlink",
) -> list[str]:
    """flower-superlink with TLS, SuperNode authentication, no runtime dependency installation.

    It listens on the coordinator's loopback (`host`): its Control API (register nodes, submit runs)
    has no user authentication in OSS Flower, so only the front door (nginx, Fleet API only) is public.
    """
    argv = [
        program,
        "--ssl-ca-certfile", ca_cert,
        "--ssl-certfile", server_cert,
        "--ssl-keyfile", server_key,
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]
    if database:
        argv += ["--database", database]
    if log_file:
        argv += ["--log-file", log_file]
    return argv


def supernode_argv(
    *,
    superlink: str,
    ca_cert: str,
    private_key: str,
    cache_dir: str,
    site_name: str,
    port: int = DEFAULT_SUPERNODE_PORT,
    max_retries: int = DEFAULT_MAX_RETRIES,
    max_wait_time: float = DEFAULT_MAX_WAIT_TIME,
    study_dir: str | None = None,
    privacy: dict[str, Any] | None = None,
    extra_node_config: dict[str, Any] | None = None,
    superexec_secret: str,
    signing_key: str,
    peer_roster: str,
    runtime_host: str = "127.0.0.1",
    program: str = "flower-supernode",
) -> list[str]:
    """flower-supernode with the CA, its authentication key, the site's cache and bounded retries.

    The node config carries the site's cache, name, study folder (default: `default_study_dir`),
    its signing key and peer roster (model verification: the ClientApp signs its contributions with
    `signing_key` and accepts only contributions signed by the sites of `peer_roster`) and privacy
    policy (`privacy`, the site bundle's [privacy] table; only SITE_POLICY_KEYS).
    """
    unknown = sorted(set(privacy or {}) - set(SITE_POLICY_KEYS))
    if unknown:
        raise BundleError(f"[privacy] {', '.join(unknown)}: not a site privacy key "
                          f"(known: {', '.join(SITE_POLICY_KEYS)})")
    node_cfg = {"cache-dir": cache_dir, "site-name": site_name,
                "study-dir": study_dir or default_study_dir(cache_dir),
                "signing-key": signing_key, "peer-roster": peer_roster,
                **(privacy or {}), **(extra_node_config or {})}
    return [
        program,
        "--superlink", superlink,
        "--root-certificates", ca_cert,
        "--auth-supernode-private-key", private_key,
        "--node-config", node_config_arg(node_cfg),
        "--isolation", SUPERNODE_ISOLATION,
        "--superexec-auth-secret-file", superexec_secret,
        "--host", runtime_host,
        "--port", str(port),
        "--max-retries", str(max_retries),
        "--max-wait-time", str(max_wait_time),
    ]


def launcher_argv(*, supernode: str, secret: str, approved: str, program: str = "slmfed",
                  warm: bool = True) -> list[str]:
    """The site's app launcher (deploy/launcher.py): runs only apps whose hash the site approved."""
    argv = [program, "site", "launcher", "--supernode", supernode, "--secret-file", secret,
            "--approved", approved]
    return argv if warm else [*argv, "--no-warm"]


def site_privacy(bundle: Bundle) -> dict[str, Any]:
    """The site bundle's [privacy] table (the site's policy); an error when it is missing."""
    privacy = bundle.data.get("privacy")
    if not isinstance(privacy, dict):
        raise BundleError(f"{bundle.root / BUNDLE_FILE}: the [privacy] table (the site's privacy policy) is missing; "
                          "regenerate the bundle (slmfed deploy init) or add it with the keys "
                          f"{', '.join(DEFAULT_SITE_PRIVACY)}")
    return dict(privacy)


def privacy_problems(privacy: dict[str, Any], where: str = "[privacy]") -> list[str]:
    """Why a site privacy policy is not valid (unknown keys, wrong types, out of bounds); [] when it is.

    Validated exactly as the ClientApp validates its node config (common.config.load_config).
    """
    out = []
    unknown = [k for k in privacy if k not in SITE_POLICY_KEYS]
    for key in unknown:
        out.append(f"{where} {key}: not a site privacy key; the ClientApp knows only {', '.join(SITE_POLICY_KEYS)}"
                   + (" (SLM-Fed never sends per-patient rows; there is nothing to switch on)"
                      if key == "share-patient-rows" else ""))
    for key, value in privacy.items():
        if key in unknown:
            continue
        try:
            load_config(node_config={key: value})
        except ConfigError as exc:
            out.append(f"{where} {key} = {value!r}: {exc}")
    return out


def policy_values(privacy: dict[str, Any]) -> dict[str, Any]:
    """The effective policy (defaults filled in, values typed) of a valid privacy table."""
    cfg = load_config(node_config={k: v for k, v in privacy.items() if k in SITE_POLICY_KEYS})
    return {k: cfg[k] for k in SITE_POLICY_KEYS}


def site_study_dir(bundle: Bundle, cache_dir: str | None = None) -> str:
    """The study folder a site bundle's SuperNode passes as `study-dir`.

    With the bundle's own cache: its [node] study-dir (what the unit / compose file make
    writable). With another cache (`slmfed site join --cache` elsewhere): a folder beside that
    cache, `<cache>-study` (the ClientApp's own default, stated explicitly), so that two sites'
    caches in one folder never share a study folder or a disclosure ledger.
    """
    node = bundle.data.get("node", {})
    own_cache = str(node.get("cache-dir", ""))
    if cache_dir is None or str(cache_dir) == own_cache:
        return str(node.get("study-dir") or default_study_dir(own_cache))
    cache = PurePosixPath(str(cache_dir))
    return str(cache.parent / f"{cache.name}-study")


def site_argv(bundle: Bundle, *, cache_dir: str | None = None, installed: bool = True,
              program: str = "flower-supernode", port: int | None = None,
              runtime_host: str = "127.0.0.1") -> list[str]:
    """The SuperNode command of a site bundle; paths as installed, or into the bundle folder.

    Used by `deploy init` (systemd unit, compose file) and `slmfed site join`, so the same
    privacy policy ([privacy]), study folder, signing key and peer roster reach the ClientApp
    however the site starts it.
    """
    if bundle.kind != "site":
        raise BundleError(f"{bundle.root}: expected a site bundle, found a {bundle.kind} bundle")
    node = bundle.data.get("node", {})
    link = bundle.data.get("superlink", {})
    where = (lambda name: f"{bundle.install_dir}/{name}") if installed else (lambda name: str(bundle.root / name))
    try:
        return supernode_argv(
            superlink=str(link["address"]),
            ca_cert=where(CA_CERT),
            private_key=where(SITE_KEY),
            cache_dir=str(cache_dir or node["cache-dir"]),
            site_name=str(node["site-name"]),
            port=int(port or node.get("port", DEFAULT_SUPERNODE_PORT)),
            max_retries=int(node.get("max-retries", DEFAULT_MAX_RETRIES)),
            max_wait_time=float(node.get("max-wait-time", DEFAULT_MAX_WAIT_TIME)),
            study_dir=site_study_dir(bundle, cache_dir),
            privacy=site_privacy(bundle),
            superexec_secret=where(SUPEREXEC_SECRET),
            signing_key=where(SIGNING_KEY),
            peer_roster=where(PEER_ROSTER),
            runtime_host=runtime_host,
            program=program,
        )
    except KeyError as exc:
        raise BundleError(f"{bundle.root / BUNDLE_FILE}: missing key {exc.args[0]!r}") from None


# ---------------------------------------------------------------- the site's app allow-list

FAB_HASH = re.compile(r"^[0-9a-f]{64}$")


def approved_apps_text(apps: dict[str, str]) -> str:
    """approved-apps.toml: `[apps."<sha256 of the FAB>"] note = "..."`, one table per approved app."""
    head = ("# Apps (FABs) this site approved: `slmfed site approve`. The site's launcher starts a ClientApp\n"
            "# only when the app's SHA-256 is listed here; any other app is refused before any of its code runs.\n")
    return head + tomli_w.dumps({"apps": {h: {"note": n} for h, n in sorted(apps.items())}})


def read_approved_apps(path: str | Path) -> dict[str, str]:
    """hash -> note from approved-apps.toml; BundleError naming the file and the problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: the site's app allow-list does not exist (run `slmfed site approve`)") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read as TOML ({exc})") from None
    apps = data.get("apps", {})
    unknown = sorted(set(data) - {"apps"})
    if unknown or not isinstance(apps, dict):
        raise BundleError(f"{path}: expected only [apps.\"<sha256>\"] tables, found {unknown or type(apps).__name__}")
    out = {}
    for h, entry in apps.items():
        if not FAB_HASH.match(h):
            raise BundleError(f"{path}: [apps.{h!r}]: expected the app's SHA-256 (64 lower-case hex digits)")
        if not isinstance(entry, dict) or not isinstance(entry.get("note", ""), str) or set(entry) - {"note"}:
            raise BundleError(f"{path}: [apps.{h}]: expected only a text `note`")
        out[h] = entry.get("note", "")
    return out
