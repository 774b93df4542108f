"""`slmfed deploy register-sites`: register each site's key with the SuperLink and record the node ids.

Why: the ServerApp must know which registered node is which site (server/registry.py reads the
record), and only the coordinator, at registration, knows that: `flwr supernode register` returns the
node id Flower gives a key. This registers exactly the sites named in the coordinator bundle's
[sites] names (each with site-keys/<name>.pub) and writes the record atomically.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tomli_w

from deploy import bundle as B


class RegisterError(RuntimeError):
    """Registration failed; the message names the site and Flower's answer."""


def _flwr() -> str:
    beside = Path(sys.executable).with_name("flwr")
    return str(beside) if beside.is_file() else "flwr"


def register_site(key_file: Path, name: str, connection: str, env: dict | None = None,
                  cwd: Path | None = None) -> int:
    """`flwr supernode register KEY CONNECTION --name NAME --format json`; the node id Flower gave it."""
    res = subprocess.run([_flwr(), "supernode", "register", str(key_file), connection, "--name", name,
                          "--format", "json"], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    start = res.stdout.find("{")
    if res.returncode == 0 and start >= 0:
        try:
            doc = json.loads(res.stdout[start:])
        except json.JSONDecodeError:
            doc = {}
        if doc.get("success") and str(doc.get("node-id", "")).isdigit():
            return int(doc["node-id"])
    raise RegisterError(f"site {name}: `flwr supernode register` failed (exit {res.returncode}): "
                        f"{(res.stdout + res.stderr).strip()[-800:]}")


def site_keys(coord: B.Bundle) -> dict[str, Path]:
    """name -> public key file for the sites the coordinator bundle names; an error for a missing key."""
    names = coord.data.get("sites", {}).get("names", [])
    out = {}
    for name in names:
        key = coord.root / B.SITE_KEYS_DIR / f"{name}.pub"
        if not key.is_file():
            raise RegisterError(f"{key}: the public key of site {name!r} is missing")
        out[name] = key
    return out


def write_registry(path: Path, entries: dict[str, tuple[int, str]]) -> None:
    from common.atomic import atomic_write_text

    doc = {"sites": {name: {"node-id": node, "public-key": pub} for name, (node, pub) in sorted(entries.items())}}
    atomic_write_text(path, "# Which registered node is which site (slmfed deploy register-sites); the ServerApp\n"
                            "# enrols only these nodes, under these names (run config site-registry).\n"
                            + tomli_w.dumps(doc))


def register_sites(coord_dir: str | Path, registry: str | Path, connection: str = "slmfed",
                   env: dict | None = None) -> dict[str, int]:
    """Register every site of the coordinator bundle and write the record; name -> node id."""
    coord = B.read_bundle(coord_dir)
    if coord.kind != "coordinator":
        raise RegisterError(f"{coord_dir}: expected the coordinator bundle, found a {coord.kind} bundle")
    entries = {}
    for name, key in site_keys(coord).items():
        node = register_site(key, name, connection, env=env)
        entries[name] = (node, key.read_text(encoding="utf-8").strip())
    write_registry(Path(registry), entries)
    return {n: e[0] for n, e in entries.items()}
