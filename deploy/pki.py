"""Certificates and SuperNode keys for a deployment, made with `cryptography`.

Why this module exists: TLS between sites and the coordinator needs a private CA (hospitals rarely
get public certificates for a research host), and Flower's SuperNode authentication needs one
NIST-curve EC key pair per site in OpenSSH format (what `flower-supernode
--auth-supernode-private-key` and `flwr supernode register` load). Private keys are written 0600
and never overwritten unless the caller says so.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 5 * 365
SERVER_DAYS = 825  # the CA/Browser-forum maximum; short enough that rotation is routine
SITE_CURVE = ec.SECP384R1()  # Flower accepts any NIST curve; P-384 is what its docs use


class PKIError(ValueError):
    """A key or certificate cannot be written or read as expected."""


@dataclass(frozen=True)
class CertKey:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(common_name: str = "SLM-Fed deployment CA", days: int = CA_DAYS) -> CertKey:
    """A self-signed CA that only signs the SuperLink's server certificate."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return CertKey(cert, key)


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(ca: CertKey, hosts: list[str], days: int = SERVER_DAYS) -> CertKey:
    """The SuperLink's TLS certificate with one SAN per host name / IP address given."""
    hosts = [h.strip() for h in hosts if h and h.strip()]
    if not hosts:
        raise PKIError("server certificate: expected at least one host name or IP address, found none")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in dict.fromkeys(hosts)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return CertKey(cert, key)


def make_site_key() -> ec.EllipticCurvePrivateKey:
    """One SuperNode authentication key (EC P-384)."""
    return ec.generate_private_key(SITE_CURVE)


# ---------------------------------------------------------------- serialisation / files

def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def ssh_public(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def write_file(path: Path, data: bytes, *, private: bool = False, force: bool = False) -> Path:
    """Write atomically; private files are created 0600 and never replaced unless force=True."""
    path = Path(path)
    if path.exists() and not force:
        raise PKIError(f"{path}: already exists; refusing to overwrite it (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # umask must not widen or narrow what we asked for
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise PKIError(f"{path}: cannot be read ({exc.strerror})") from None
    except ValueError:
        raise PKIError(f"{path}: is not a PEM certificate") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a PEM (PKCS#8/SEC1) or OpenSSH EC private key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PKIError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path}: is not an unencrypted private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: expected an EC private key, found {type(key).__name__}")
    return key


def load_ssh_public(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise PKIError(f"{path}: cannot be read ({exc.strerror})") from None
    except (ValueError, TypeError):
        raise PKIError(f"{path}: is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"{path}: expected an EC (ecdsa-sha2-nistp*) public key, found {type(key).__name__}")
    return key


def same_public_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def san_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when `ca` signed `cert` (the check a TLS client does against its root)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):  # wrong issuer name or wrong signature
        return False
    return True


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER bytes, hex with colons (what `openssl x509 -fingerprint -sha256` prints)."""
    from cryptography.hazmat.primitives import hashes

    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def flower_public_key_b64(key) -> str:
    """The `flwr-public-key` header a SuperNode with this key sends on every Fleet call (Flower 1.42:
    base64 of the PEM SubjectPublicKeyInfo, flwr.supernode.node_auth_http_interceptor)."""
    import base64

    from cryptography.hazmat.primitives import serialization

    pub = key.public_key() if hasattr(key, "public_key") else key
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(pem).decode("ascii")


def hashes_sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()
