"""The generated nginx front door under unauthenticated load (nginx only: a stand-in upstream counts the
connections nginx opens to the SuperLink's address; no Flower process). nginx is started by PID with the
generated config and stopped by PID (deploy.loopback)."""
from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

import pytest

from deploy import bundle as B
from deploy import pki
from deploy.loopback import INTERNAL_HOST, LoopbackFederation, nginx_binary


class CountingUpstream:
    """Listens where the SuperLink would; counts connections and bytes that reach it, answers nothing."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.bytes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.settimeout(0.5)
            try:
                while chunk := conn.recv(65536):
                    self.bytes += len(chunk)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _request(address: str, ca: Path, headers: dict[str, str], body: bytes = b"", length: int | None = None) -> int:
    """POST /v1/fleet/push-object with these headers; sends `body` (Content-Length `length`, default its
    size) and returns the status nginx answers."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall((f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/protobuf\r\n"
                   f"{head}Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
                   ).encode() + body)
        reply = s.recv(200).decode("latin-1")
    return int(reply.split()[1])


def _signed_headers(pub) -> dict[str, str]:
    # what a SuperNode sends (flwr.supernode.node_auth_http_interceptor); the signature is not checked here
    return {"flwr-public-key": pki.flower_public_key_b64(pub),
            "flwr-timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
            "flwr-signature": "MGUCMQD" + "A" * 120 + "=="}


def test_front_door_refuses_unsigned_and_oversize_bodies_before_the_superlink(tmp_path):
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    fed = LoopbackFederation(tmp_path, ["a", "b"])
    upstream = CountingUpstream(INTERNAL_HOST, fed.internal_port)
    try:
        fed.start_front_door()
        ca = fed.site_bundle("a") / B.CA_CERT
        site_pub = pki.load_ssh_public(fed.site_bundle("a") / B.SITE_PUB)
        # no authentication headers: refused, and a 200 MB announced body is never read nor forwarded
        assert _request(fed.address, ca, {}, b"x" * 1024) == 400
        assert _request(fed.address, ca, {}, length=200 * 1024 * 1024) in (400, 413)  # the size is checked first
        # headers of a key that is no site key of the deployment
        stranger = _signed_headers(pki.make_site_key().public_key())
        assert _request(fed.address, ca, stranger, b"x" * 1024) == 400
        # a site's key but no signature / a malformed timestamp
        assert _request(fed.address, ca, {**_signed_headers(site_pub), "flwr-signature": ""}, b"x") == 400
        assert _request(fed.address, ca, {**_signed_headers(site_pub), "flwr-timestamp": "soon"}, b"x") == 400
        # a site's headers, but a body over the cap (one array chunk + margin)
        assert _request(fed.address, ca, _signed_headers(site_pub), length=B.FLEET_MAX_BODY_BYTES + 1) == 413
        assert upstream.accepted == 0 and upstream.bytes == 0, "a refused call reached the SuperLink's address"
        # control: a site's headers and a chunk-sized body are forwarded (the stand-in answers nothing: 502)
        assert _request(fed.address, ca, _signed_headers(site_pub), b"x" * B.FLEET_CHUNK_BYTES) == 502
        assert upstream.accepted >= 1 and upstream.bytes > 0
    finally:
        fed.stop()
        upstream.close()
    assert all(p.poll() is not None for p in fed.procs.values())
    log = fed.log("front-door-access")
    assert "/v1/fleet/push-object" in log and " 400 " in log and " 413 " in log
    assert "MGUCMQD" not in log and pki.flower_public_key_b64(site_pub)[:40] not in log  # no header is logged


def test_flood_leaves_the_superlink_memory_flat(tmp_path):
    """The real flower-superlink behind the generated front door, flooded from the public address for a
    few seconds (parallel POSTs announcing 200 MB or 4 MB without a key and with an unknown key, slow
    connections): its resident memory (process + descendants, /proc VmRSS) stays within +100 MB of where it
    had settled after its start,
    it stays up, and nginx answered every flood call itself (400 / 413 / 503 or a closed connection).
    The longer flood with figures: `slmfed bench deploy --part flood`."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    from simulation.bench_deploy import flood

    fed = LoopbackFederation(tmp_path, ["a", "b"])
    try:
        fed.start_superlink()  # and the front door
        fleet_before = fed.log("superlink").count("/v1/fleet/")
        res = flood(fed, seconds=4.0, threads=4, slow=40)
        fleet_after = fed.log("superlink").count("/v1/fleet/")
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())
    mb = 1024 * 1024
    print(f"SuperLink RSS before {res['before'] / mb:.1f} MB, peak {res['peak'] / mb:.1f} MB, "
          f"after {res['after'] / mb:.1f} MB; answers {res['answers']}")
    assert res["superlink alive"] and res["before"] > 0
    assert res["peak"] - res["before"] < 100 * mb, res
    calls = {k: n for k, n in res["answers"].items() if k[0] != "slow"}
    assert sum(calls.values()) >= 8, res["answers"]  # each caller got through at least one call
    assert {status for _, status in calls} <= {"400", "413", "503", "reset"}, res["answers"]
    assert any(status == "400" for _, status in calls), res["answers"]  # under the cap: refused for its headers
    assert sum(n for k, n in res["answers"].items() if k[0] == "slow") == 40
    assert fleet_after == fleet_before, "a flood call reached the SuperLink's Fleet API"
