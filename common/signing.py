"""Site signing keys and the peer roster: who may contribute to a model a site computes on.

Why: a site computes only on models it can derive itself from the study's settings and the *signed*
contributions of the sites it trusts (client/verify.py). A contribution (a training update, CF
statistics, standardisation sums) is signed by the site that made it with its Ed25519 key; the set
of public keys a site trusts, its peer roster, comes from its own bundle (written by `slmfed deploy
init`, changed only by the site's admin), never from the coordinator, who could otherwise invent a
site.

Files:
  signing key   PEM, PKCS#8, unencrypted Ed25519 private key (`study-signing.key` in a site bundle)
  peer roster   TOML: `[sites]` table, `"<site-name>" = "<base64 of the 32-byte raw public key>"`
                (`peer-roster.toml`; the same file in every site bundle of a deployment)
Simulation: a virtual site's key is `simulation:<site-name>` (derived from the name, so every
process of a simulation agrees on it without files) and its roster `simulation:<name>,<name>...`.
Such keys are public by construction: `deploy check` refuses them in a site bundle.
"""
from __future__ import annotations

import base64
import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIMULATION = "simulation:"
SIGNING_KEY_FILE = "study-signing.key"
PEER_ROSTER_FILE = "peer-roster.toml"


class SigningError(ValueError):
    """A key or roster cannot be read, or is not what it should be."""


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def simulation_key(site_name: str) -> Ed25519PrivateKey:
    """A virtual site's key, derived from its name (simulation only: anyone can derive it)."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"slmfed-simulation-site:{site_name}".encode()).digest())


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def roster_text(public_keys: Mapping[str, str]) -> str:
    """peer-roster.toml for {site-name: base64 public key}."""
    head = ("# The sites whose signed contributions this site accepts (SLM-Fed model verification).\n"
            "# Written by `slmfed deploy init`; only this site's admin changes it. The coordinator cannot.\n[sites]\n")
    return head + "".join(f"{json.dumps(name)} = {json.dumps(pub)}\n" for name, pub in sorted(public_keys.items()))


def load_private_key(ref: str) -> Ed25519PrivateKey:
    """The site's signing key from its node config value (a PEM file, or simulation:<name>)."""
    if ref.startswith(SIMULATION):
        return simulation_key(ref[len(SIMULATION):])
    path = Path(ref)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"signing-key {path}: cannot be read as an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing-key {path}: expected an Ed25519 key, found {type(key).__name__}")
    return key


@dataclass(frozen=True)
class Roster:
    """{site-name: public key} a site trusts."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def load(cls, ref: str) -> "Roster":
        if ref.startswith(SIMULATION):
            names = [n.strip() for n in ref[len(SIMULATION):].split(",") if n.strip()]
            return cls({n: simulation_key(n).public_key() for n in names})
        path = Path(ref)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SigningError(f"peer-roster {path}: cannot be read as TOML ({exc})") from None
        sites = data.get("sites")
        if not isinstance(sites, dict) or not sites:
            raise SigningError(f"peer-roster {path}: expected a [sites] table of site-name = public key, found none")
        keys = {}
        for name, value in sites.items():
            try:
                raw = base64.b64decode(str(value), validate=True)
                keys[str(name)] = Ed25519PublicKey.from_public_bytes(raw)
            except (ValueError, TypeError) as exc:
                raise SigningError(f"peer-roster {path}: site {name!r}: not a base64 Ed25519 public key ({exc})") from None
        return cls(keys)

    def verify(self, site: str, message: bytes, signature: bytes) -> bool:
        key = self.keys.get(site)
        if key is None:
            return False
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def canonical(statement: Mapping[str, Any]) -> bytes:
    """The bytes a statement's signature covers (sorted keys, no spaces; floats as Python's repr, which
    reads back to the same float)."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def sign(key: Ed25519PrivateKey, statement: Mapping[str, Any]) -> tuple[str, bytes]:
    """(statement text, signature) as they travel in a reply's "signed" record."""
    text = canonical(statement)
    return text.decode(), key.sign(text)
