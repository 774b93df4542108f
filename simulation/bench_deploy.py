"""`slmfed bench deploy`: the same tiny study on a loopback deployment (TLS + SuperNode auth, behind the
nginx front door, sites running only their approved app through `slmfed site launcher`) and in
simulation, with the fixed overheads measured separately.

Where the deployment's extra time goes: starting the SuperLink and SuperNodes (once), SuperNodes
polling the SuperLink for messages (up to a poll interval per message: 3 s, a literal `time.sleep(3)` in
flwr 1.42's flwr/supernode/start_client_internal.py, with no flag or environment variable to change it),
and a ClientApp process per message. "before": the launcher starts a fresh Python per message (`--no-warm`, as Flower's own
flower-superexec does: Python + torch + MONAI imports every time); "after": it forks each ClientApp
from a warm interpreter that imported them once (the default). Simulation keeps one process per
virtual site warm, so it pays the import once.

`--part flood`: the real flower-superlink behind the generated front door, flooded from the public
address by callers without a key (parallel large POSTs, an announced 200 MB body each), with an unknown
key, and by many slow connections (headers sent a byte at a time); it prints the SuperLink's resident
memory (VmRSS of its process and descendants, /proc) before, at peak (sampled every 50 ms) and after,
and what the front door answered. tests/test_deploy_front_door.py asserts the +100 MB bound on a short
version of the same flood (flood()).
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def configure(parser) -> None:
    parser.add_argument("--part", choices=("study", "flood"), default="study",
                        help="study: the tiny study, deployment vs simulation (default); flood: the SuperLink's "
                             "memory under an unauthenticated flood of the front door")
    parser.add_argument("--flood-seconds", type=float, default=20.0, help="flood: how long each caller keeps going")
    parser.add_argument("--flood-threads", type=int, default=16, help="flood: parallel callers of each kind")
    parser.add_argument("--slow-connections", type=int, default=150, help="flood: slow connections held open")
    parser.add_argument("--with-site-key", action="store_true",
                        help="flood: also callers with a registered site's PUBLIC key and a junk signature (the "
                             "front door forwards them, up to 6 MiB each, to the SuperLink, which refuses them)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (median reported)")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds of the DL model")
    parser.add_argument("--patients", type=int, default=24, help="patients at the training site")
    parser.add_argument("--skip-cold", action="store_true",
                        help="study: skip the 'before' deployment (a fresh Python per message), the slowest part")


# the benchmark's small caches cannot hold k = 10 patients of each class per fold: both paths lower
# every site's k to the policy's floor (the same in simulation and deployment, so timings compare)
BENCH_POLICY = {"min-cell-size": 3}


def _caches(work: Path, n: int) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from fedtools import make_cache  # prepared-cache double in the `slmfed prepare` format

    caches = {"center-primary": work / "primary", "center-external": work / "external"}
    make_cache(caches["center-primary"], n, 1, "center-primary")
    make_cache(caches["center-external"], max(8, n // 2), 2, "center-external")
    return caches


def _import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import client.app"], check=True, cwd=REPO)
    return time.perf_counter() - t0


def _simulation(caches: dict[str, Path], cfg: dict, run_dir: Path) -> float:
    code = (
        "import json,sys; from simulation.runner import run_study; "
        "run_study(json.loads(sys.argv[1]), json.loads(sys.argv[2]))"
    )
    import json

    sites = [{"cache-dir": str(c), "site-name": s, **BENCH_POLICY} for s, c in caches.items()]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(sites), json.dumps({**cfg, "run-dir": str(run_dir)})],
                   check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t0


def _approved_app(work: Path) -> tuple[Path, str]:
    """The app as the sites approve it: its FAB built once, unpacked (a `flwr run` of it has the same hash)."""
    import hashlib
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    app = work / "approved-app"
    zipfile.ZipFile(io.BytesIO(fab)).extractall(app)
    shutil.rmtree(app / ".info")
    return app, hashlib.sha256(fab).hexdigest()


def _deployment(work: Path, caches: dict[str, Path], cfg: dict, run_dir: Path, app: Path, digest: str,
                warm: bool) -> dict[str, float]:
    from deploy.loopback import LoopbackFederation

    t: dict[str, float] = {}
    with LoopbackFederation(work, list(caches), privacy=BENCH_POLICY, warm=warm) as fed:
        t0 = time.perf_counter()
        fed.start_superlink()
        t["superlink start"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fed.register_sites()
        t["register sites"] = time.perf_counter() - t0
        for s in caches:
            fed.approve(s, digest)
        t0 = time.perf_counter()
        for s, c in caches.items():
            fed.join(s, c)
        fed.wait_connected(len(caches))
        t["supernodes connected"] = time.perf_counter() - t0
        res, t["study"] = fed.run_study(app, {**cfg, "run-dir": str(run_dir)})
        if res.returncode != 0 or not (run_dir / "results.json").is_file():
            raise RuntimeError(f"deployment study failed:\n{(res.stdout + res.stderr)[-3000:]}")
        t["fleet"] = fleet_calls(fed.logs / "front-door-access.log")
    t["requests"] = _requests(run_dir)
    return t


def fleet_calls(access_log: Path) -> dict[str, tuple[int, float]]:
    """Fleet API calls through the front door during the deployment, per endpoint: (calls, the seconds
    nginx spent on them, $request_time summed). A SuperNode makes its calls one after the other, so
    their time adds to the study's; pull-object / push-object are one call per object of a message
    (each array of a model, each chunk), which is what a deployed round mostly waits for."""
    calls: dict[str, list] = {}
    for line in access_log.read_text().splitlines():
        parts = line.split('"')
        if len(parts) < 3:
            continue
        request, tail = parts[1].split(), parts[2].split()
        if len(request) < 2 or not tail:
            continue
        c = calls.setdefault(request[1].rsplit("/", 1)[-1], [0, 0.0])
        c[0] += 1
        c[1] += float(tail[-1])
    return {k: (n, sec) for k, (n, sec) in calls.items()}


def _requests(run_dir: Path) -> int:
    """Requests the study sent, counted from the replies each site released (results.json): one request
    goes to the sites of a step at once, so a step counts once (the site that answered it most)."""
    import json

    released = json.loads((run_dir / "results.json").read_text())["released"]
    kinds = {k for per in released.values() for k in per}
    return sum(max(per.get(k, 0) for per in released.values()) for k in kinds)


# ---------------------------------------------------------------- --part flood

def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants (VmRSS in /proc/PID/status), 0 for a process gone."""
    from common.processes import descendants

    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return total


def settled_rss(pid: int, timeout: float = 30.0) -> int:
    """rss_bytes once it has settled (the last four samples, 1 s, within 1 MB): a SuperLink that just
    answered TLS is still starting its helper process, which grows for a few seconds."""
    samples: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = (samples + [rss_bytes(pid)])[-4:]
        if len(samples) == 4 and max(samples) - min(samples) < 1024 * 1024:
            break
        time.sleep(0.25)  # the sampling interval of the probe
    return samples[-1]


def _tls(address: str, ca: Path) -> ssl.SSLSocket:
    host, port = address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=20)
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname=host)


def big_post(address: str, ca: Path, headers: dict[str, str], announced: int, send: int) -> str:
    """POST /v1/fleet/push-object announcing `announced` bytes, sending up to `send` of them; the status
    the front door answers ('reset' when it closed the connection first)."""
    host = address.rsplit(":", 1)[0]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    try:
        with _tls(address, ca) as s:
            s.sendall((f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: {host}\r\n"
                       f"Content-Type: application/protobuf\r\n{head}Content-Length: {announced}\r\n"
                       "Connection: close\r\n\r\n").encode())
            chunk = b"x" * 65536
            try:
                for _ in range(send // len(chunk)):
                    s.sendall(chunk)
            except OSError:
                pass  # nginx answered and closed while the body was still coming
            reply = s.recv(64).decode("latin-1")
        return reply.split()[1] if reply.startswith("HTTP/") else "reset"
    except OSError:
        return "reset"


def flower_headers(public_key_b64: str) -> dict[str, str]:
    """What a SuperNode sends (flwr.supernode.node_auth_http_interceptor); the signature is junk."""
    return {"flwr-public-key": public_key_b64, "flwr-timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
            "flwr-signature": "MGUCMQD" + "A" * 120 + "=="}


def flood(fed, *, seconds: float, threads: int, slow: int, site_key: bool = False) -> dict:
    """Flood the front door of a started LoopbackFederation; the SuperLink's RSS before / peak / after."""
    from deploy import bundle as B
    from deploy import pki

    ca = fed.site_bundle(fed.sites[0]) / B.CA_CERT
    pid = fed.procs["superlink"].pid
    before = settled_rss(pid)
    peak = [before]
    answers: Counter = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            stop.wait(0.05)

    def caller(kind: str) -> None:
        stranger = (pki.flower_public_key_b64(pki.load_ssh_public(fed.site_bundle(fed.sites[0]) / B.SITE_PUB))
                    if kind == "site key" else pki.flower_public_key_b64(pki.make_site_key().public_key()))
        deadline = time.monotonic() + seconds
        big = True
        while time.monotonic() < deadline:
            headers = {} if kind == "no key" else flower_headers(stranger)
            # alternately over the body cap (200 MB announced) and under it (4 MB: refused for its headers)
            announced = (200 if big else 4) * 1024 * 1024
            status = big_post(fed.address, ca, headers, announced=announced, send=min(announced, 8 * 1024 * 1024))
            big = not big
            with lock:
                answers[(kind, status)] += 1

    def slowloris(i: int) -> None:
        try:
            with _tls(fed.address, ca) as s:
                s.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\n")
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline and not stop.is_set():
                    s.sendall(b"X")  # a header that never ends, a byte at a time
                    stop.wait(1.0)
                status = "held"
        except OSError:
            status = "closed by nginx"
        with lock:
            answers[("slow", status)] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    workers = [threading.Thread(target=caller, args=(k,), daemon=True)
               for k in ("no key", "unknown key", *(["site key"] if site_key else [])) for _ in range(threads)]
    workers += [threading.Thread(target=slowloris, args=(i,), daemon=True) for i in range(slow)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60)
    elapsed = time.perf_counter() - t0
    stop.set()
    sampler.join(5)
    after = rss_bytes(pid)
    return {"before": before, "peak": max(peak[0], after), "after": after, "answers": dict(answers),
            "seconds": elapsed, "superlink alive": fed.procs["superlink"].poll() is None}


def run_flood(args) -> int:
    from deploy.loopback import LoopbackFederation

    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        with LoopbackFederation(Path(tmp), ["center-primary", "center-external"]) as fed:
            fed.start_superlink()  # and the front door
            fed.register_sites()
            res = flood(fed, seconds=args.flood_seconds, threads=args.flood_threads, slow=args.slow_connections,
                        site_key=args.with_site_key)
    mb = 1024 * 1024
    print(f"front door flood, {args.flood_seconds:.0f} s: {args.flood_threads} callers without a key and "
          f"{args.flood_threads} with an unknown key (each POST announces 200 MB or 4 MB, sends up to 8 MB), "
          f"{args.slow_connections} slow connections"
          + (f", {args.flood_threads} with a site's public key and a junk signature" if args.with_site_key else ""))
    print(f"  SuperLink RSS (process + descendants): before {res['before'] / mb:.1f} MB, peak {res['peak'] / mb:.1f} MB "
          f"(+{(res['peak'] - res['before']) / mb:.1f}), after {res['after'] / mb:.1f} MB "
          f"(+{(res['after'] - res['before']) / mb:.1f}); SuperLink {'alive' if res['superlink alive'] else 'DEAD'}")
    for (kind, status), n in sorted(res["answers"].items()):
        print(f"  {kind:<12} {status:<16} {n:6d}")
    # the +100 MB bound is the front door's claim for callers without a site key
    return 0 if res["superlink alive"] and (args.with_site_key or res["peak"] - res["before"] < 100 * mb) else 1


def run(args) -> int:
    if args.part == "flood":
        return run_flood(args)
    cfg = {"scenario": "paper", "models": "dl", "folds": 2, "num-rounds": args.rounds, "local-epochs": 1}
    sim, before, after = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(tmp)
        caches = _caches(work, args.patients)
        app, digest = _approved_app(work)
        imp = statistics.median(_import_seconds() for _ in range(3))
        for i in range(args.repeats):
            sim.append(_simulation(caches, cfg, work / f"sim-run-{i}"))
            if not args.skip_cold:
                before.append(_deployment(work / f"cold-{i}", caches, cfg, work / f"cold-run-{i}", app, digest, warm=False))
            after.append(_deployment(work / f"warm-{i}", caches, cfg, work / f"warm-run-{i}", app, digest, warm=True))
    sim_s = statistics.median(sim)
    fits = cfg["folds"] + 1
    rounds = fits * args.rounds
    print(f"tiny paper study, model dl, {fits} fits x {args.rounds} rounds, {args.patients} training patients; "
          f"median of {args.repeats}")
    print(f"  simulation (Ray, warm workers):                   {sim_s:8.1f} s   ({sim_s / rounds:.1f} s per round incl. eval; "
          f"runs {', '.join(f'{x:.1f}' for x in sim)}; the whole `run_study` process, Ray start included)")
    print(f"  load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for label, runs in (("deployment, before (fresh Python per message):", before),
                        ("deployment, after (warm launcher, forked):     ", after)):
        if not runs:
            continue
        study = statistics.median(d["study"] for d in runs)
        print(f"  {label}   {study:8.1f} s   ({study / rounds:.1f} s per round incl. eval; "
              f"{study / sim_s:.1f}x simulation; runs {', '.join(format(d['study'], '.1f') for d in runs)})")
    med = {k: statistics.median(d[k] for d in before + after) for k in (before + after)[0] if k != "fleet"}
    print(f"  requests the study sent (steps, each to the sites at once): {med['requests']:.0f}; the warm deployment "
          f"spent {statistics.median(d['study'] for d in after) / med['requests']:.2f} s per request, simulation "
          f"{sim_s / med['requests']:.2f} s (its Ray start included)")
    fleet = after[len(after) // 2]["fleet"]
    print("  Fleet API calls through the front door (warm deployment, one run; calls, nginx request time summed):")
    for name, (n, sec) in sorted(fleet.items(), key=lambda kv: -kv[1][1]):
        print(f"    {name:<30} {n:6d} calls {sec:7.1f} s  ({1000 * sec / n:.1f} ms per call)")
    print("  (pull-object / push-object: one call per object of a message, one after the other; a model and each")
    print("  relayed signed update are two arrays (common/packing.py) and their 5 MiB chunks; ~20 ms per call on")
    print("  loopback, whether or not nginx keeps its TLS connections to the SuperLink open: the SuperLink's work)")
    print("  The rest of a request: the site's ClientApp run (forked, installs the FAB, verifies the model, computes)")
    print("  and the SuperNode's idle poll (a literal 3 s sleep in flwr 1.42) and 0.5 s wait for a reply to push.")
    print("  deployment fixed costs (once per deployment, not in the study time):")
    for k in ("superlink start", "register sites", "supernodes connected"):
        print(f"    {k:<24} {med[k]:6.1f} s")
    print(f"  per message before: `import client.app` alone takes {imp:.1f} s in a fresh Python; after: the launcher's")
    print("  forkserver imported torch / MONAI / Flower once. Both wait for the SuperNode's poll of the SuperLink.")
    return 0
