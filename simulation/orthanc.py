"""A private Orthanc (with its DICOMweb plugin) on loopback: the site PACS of the fetch tests and
`slmfed bench fetch`.

Orthanc is the Debian package `orthanc` (+ `orthanc-dicomweb`); nothing here installs it. Each
instance gets its own configuration, storage folder and free loopback ports, runs as a child
process and is stopped by its PID (never a system service, never by name). Instances are stored
through the REST API (POST /instances), the way an archive ingests exports.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
PLUGIN_NAMES = ("libOrthancDicomWeb.so",)


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None."""
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)),
                                           None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library, or None."""
    for d in PLUGIN_DIRS:
        for name in PLUGIN_NAMES:
            p = Path(d) / name
            if p.is_file():
                return str(p)
        hits = sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []
        if hits:
            return str(hits[0])
    return None


def missing() -> str:
    """Why a local Orthanc cannot start here ('' when it can)."""
    if orthanc_binary() is None:
        return "the orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return ""


def make_tls(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway CA and a server certificate for `host` signed by it: (ca.pem, server.pem with the
    certificate and its key in one file). For TLS tests of the fetch transports."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slmfed test PACS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # Orthanc 1.10's civetweb: RSA
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, server_pem = folder / "ca.pem", folder / "server.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    os.chmod(server_pem, 0o600)
    return ca_pem, server_pem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """One running Orthanc: REST/DICOMweb on http_port, DIMSE on dicom_port (AE title `aet`)."""

    root: Path
    username: str = "site"
    password: str = "orthanc-test-secret"
    aet: str = "TESTPACS"
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)  # AE name -> (host, port) for C-MOVE
    http_port: int = 0
    dicom_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:  # plain HTTP: Debian's Orthanc 1.10.1 crashes on its first HTTPS connection here
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout_s: float = 30.0) -> "Orthanc":
        why = missing()
        if why:
            raise RuntimeError(why)
        self.root.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        storage = self.root / "storage"
        storage.mkdir(exist_ok=True)
        config = {
            "Name": "slmfed-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomModalities": {name: [name, host, port] for name, (host, port) in self.modalities.items()},
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "StorageCompression": False,
            "HttpCompressionEnabled": False,
            "StableAge": 3600,  # no "stable" processing while a test runs
            "ConcurrentJobs": 1,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
        }
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        log = open(self.root / "orthanc.log", "wb")
        self.proc = subprocess.Popen([orthanc_binary(), str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True, env={**os.environ, "TCP_NODELAY": "1"})
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
            try:
                self.request("GET", "/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within {timeout_s:g} s")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/dicom"):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            data = rsp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def store(self, paths) -> int:
        """POST each file to /instances; returns how many were stored."""
        n = 0
        for p in paths:
            self.request("POST", "/instances", Path(p).read_bytes())
            n += 1
        return n

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:  # its storage is throwaway: no clean shutdown (which takes 1-2 s)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
