"""Which connected node is which site: the coordinator's site registry, never the node's own claim.

Why: a SuperNode reports a `site-name` in its info reply, but anyone whose key was registered (or a
site misconfigured) could claim any name. `slmfed deploy register-sites` registers each site's key
with the SuperLink and records the node id Flower gave it, in a TOML file on the coordinator:

    [sites.center-primary]
    node-id = 1234567890
    public-key = "ecdsa-sha2-nistp384 AAAA... slmfed-site-center-primary"

The ServerApp (run config `site-registry`, the file's path) enrols and names sites only from this
record; any other connected node is logged and never sent a message.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # as `slmfed deploy init --sites` accepts them
MAX_NODE_ID = 2**64 - 1


class RegistryError(ValueError):
    """The site registry cannot be used; the message names the file and the problem."""


def load_site_registry(path: str | Path) -> dict[int, str]:
    """node id -> site name from the registry file, every entry validated."""
    path = Path(path)
    if not path.is_absolute():
        raise RegistryError(f"site-registry {str(path)!r}: expected an absolute path to the coordinator's registry")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: the site registry does not exist (run register-sites.sh on the coordinator)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"{path}: cannot be read as TOML ({exc})") from None
    sites = data.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise RegistryError(f"{path}: expected a [sites.<name>] table per site, found none")
    out: dict[int, str] = {}
    for name, entry in sites.items():
        if not SITE_NAME.match(name):
            raise RegistryError(f"{path}: [sites.{name!r}]: not a site name (lower-case letters, digits, '.', '_', '-')")
        node = entry.get("node-id") if isinstance(entry, dict) else None
        if isinstance(node, bool) or not isinstance(node, int) or not 0 < node <= MAX_NODE_ID:
            raise RegistryError(f"{path}: [sites.{name}] node-id: expected a positive 64-bit integer, found {node!r}")
        if node in out:
            raise RegistryError(f"{path}: node {node} is recorded for both {out[node]!r} and {name!r}")
        out[node] = name
    return out
