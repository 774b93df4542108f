"""`slmfed bench fetch`: `slmfed fetch` from a private Orthanc on loopback (DICOMweb, DIMSE C-GET,
DIMSE C-MOVE) in DICOM objects per second, against copying the same files on disk.

A synthetic cohort (classic export: one file per slice, DICOM SEG masks) is stored into a fresh
Orthanc (simulation/orthanc.py); each run fetches every patient into a new site folder (queries,
series filter, retrieval, the atomic write of each object), so the figure is the whole command's,
not the wire's. The disk copy is shutil.copyfile of the same files. Medians over --repeats.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="synthetic cohort size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per transport (median)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")


def _copy(files: list[Path], dest: Path) -> float:
    dest.mkdir(parents=True)
    t = time.perf_counter()
    for i, f in enumerate(files):
        shutil.copyfile(f, dest / f"{i}.dcm")
    return time.perf_counter() - t


def run(args) -> int:
    from client import fetch
    from client.series import SeriesRules
    from simulation import orthanc as orthanc_mod
    from simulation.synth import generate_cohort

    why = orthanc_mod.missing()
    if why:
        print(f"slmfed bench fetch: cannot run: {why}")
        return 1
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="slmfed-bench-fetch-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        cohort = root / "cohort"
        if not cohort.exists():
            generate_cohort(cohort, args.preset, 0, progress=False, export="classic", masks="seg")
        site_src = cohort / "center-primary"
        files = [p for p in sorted((site_src / "dicom").rglob("*")) if p.is_file()]
        ids = [line.split(",")[0] for line in (site_src / "clinical.csv").read_text().splitlines()[1:] if line]
        move_port = orthanc_mod.free_port()
        server = orthanc_mod.Orthanc(root / f"orthanc-{os.getpid()}", modalities={"SLMBENCH": ("127.0.0.1", move_port)})
        server.start()
        try:
            server.store(files)
            secret = root / "secret"
            secret.write_text(server.password + "\n")
            os.chmod(secret, 0o600)
            tables = {
                "dicomweb": {"transport": "dicomweb", "url": server.dicomweb_url, "auth": "basic",
                             "username": server.username, "secret-file": str(secret)},
                "dimse c-get": {"transport": "dimse", "host": "127.0.0.1", "port": server.dicom_port,
                                "called-ae": server.aet, "calling-ae": "SLMBENCH", "retrieve": "c-get"},
                "dimse c-move": {"transport": "dimse", "host": "127.0.0.1", "port": server.dicom_port,
                                 "called-ae": server.aet, "calling-ae": "SLMBENCH", "retrieve": "c-move",
                                 "move-port": move_port},
            }
            pacs = fetch.parse_pacs(tables, root)
            worklist = [fetch.WorkItem(i + 2, pid, pid) for i, pid in enumerate(ids)]
            times: dict[str, list[float]] = {"disk copy": []}
            counts: dict[str, int] = {"disk copy": len(files)}
            for r in range(args.repeats):
                times["disk copy"].append(_copy(files, root / f"copy-{r}"))
                for name in tables:
                    site = root / f"site-{name.replace(' ', '-')}-{r}"
                    rep = fetch.fetch_site(site, worklist, pacs, name, SeriesRules(), progress=False)
                    failed = [x for x in rep.results if x.status == "failed"]
                    if failed:
                        print(f"slmfed bench fetch: {name}: {failed[0].patient_id}: {failed[0].reason}")
                        return 1
                    counts[name] = sum(x.fetched for x in rep.results)
                    times.setdefault(name, []).append(rep.elapsed_s)
        finally:
            server.stop()
        copy_rate = counts["disk copy"] / statistics.median(times["disk copy"])
        print(f"slmfed bench fetch: {len(ids)} patients, {len(files)} DICOM files (classic + SEG), "
              f"Orthanc on loopback, median of {args.repeats}")
        print(f"{'transport':<14}{'objects':>8}{'seconds':>10}{'objects/s':>11}{'vs disk copy':>14}")
        for name, ts in times.items():
            med = statistics.median(ts)
            rate = counts[name] / med
            print(f"{name:<14}{counts[name]:>8}{med:>10.3f}{rate:>11.0f}{rate / copy_rate:>13.3f}x")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
