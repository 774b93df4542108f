"""`slmfed bench prepare`: prepare throughput next to a bare pydicom parse of the same files.

Figures (medians over --runs, warm OS file cache for both):
    parse      time for pydicom.dcmread of every file under each site's dicom/ once (one process)
    prepare    `prepare_site` into a fresh cache with --workers, patients/s
    ratio      prepare / parse                  (target <= 2.0 with --workers 2)
    re-run     prepare again with nothing changed, as % of the first run (target < 10 %)
    forms      (default data only) the same cohort exported classic single-frame, Enhanced MR
               multi-frame, and enhanced + DICOM SEG masks: prepare time per patient and per image
               (slice or frame) of each, next to each other, the forms alternating within each run and
               the ratio to classic taken within a run (target: enhanced no slower per image)
    mosaic     (--mosaic, default data only) the Siemens site of the cohort exported with its DWI and ADC
               as Siemens mosaics + CSA (`slmfed synth --export mosaic`) next to the classic export:
               prepare time per image (slice; a mosaic tile counts as one) and the DWI + ADC read alone
               per image, alternating within each run, ratio to classic within a run (target <= 1.1)
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a site folder, or a cohort folder of site folders "
                                       "(default: a fresh `slmfed synth --preset tiny` cohort)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--workers", type=int, default=2, help="prepare worker processes")
    parser.add_argument("--no-forms", action="store_true", help="skip the classic / enhanced / SEG comparison")
    parser.add_argument("--mosaic", action="store_true",
                        help="also compare Siemens mosaic DWI / ADC with the classic export, per image")


def _sites(data: Path) -> list[Path]:
    if (data / "dicom").is_dir():
        return [data]
    sites = sorted(p for p in data.iterdir() if (p / "dicom").is_dir())
    if not sites:
        raise SystemExit(f"bench prepare: {data} is neither a site folder nor a folder of site folders")
    return sites


def _parse_all(files: list[Path]) -> int:
    import pydicom
    from pydicom.errors import InvalidDicomError

    n = 0
    for f in files:
        try:
            pydicom.dcmread(f)
            n += 1
        except InvalidDicomError:
            pass
    return n


def _forms(tmp: Path, classic: Path, cfg: dict, runs: int) -> None:
    """Prepare time of the same cohort written as classic slices, Enhanced MR and enhanced + SEG.
    The forms alternate within each run (order reversed every other run), so a change in machine load
    hits all of them alike; the ratios to classic are taken within a run, then the median is reported."""
    from client.prepare import prepare_site
    from simulation.synth import generate_cohort

    cohorts = {"classic + NIfTI": classic}
    for name, export, masks in (("enhanced + NIfTI", "enhanced", "nifti"), ("enhanced + SEG", "enhanced", "seg")):
        cohorts[name] = tmp / name.replace(" + ", "-")
        generate_cohort(cohorts[name], preset="tiny", seed=0, progress=False, export=export, masks=masks)
    names = list(cohorts)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    counts: dict[str, tuple[int, int]] = {}
    for r in range(runs + 1):  # run 0 warms the file cache and the imports, and is not counted
        for name in (names if r % 2 else names[::-1]):
            t, c = time.perf_counter(), _cpu()
            patients = images = 0
            ph: dict[str, float] = {}
            for s in _sites(cohorts[name]):
                rep = prepare_site(s, tmp / f"forms{r}" / name / s.name, cfg, progress=False)
                patients, images = patients + rep.included, images + rep.dicom_files
                for k, v in rep.timings.items():
                    ph[k] = ph.get(k, 0.0) + v
            if r:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(_cpu() - c)
                for k, v in ph.items():
                    phases[name].setdefault(k, []).append(v)
            counts[name] = (patients, images)
            shutil.rmtree(tmp / f"forms{r}", ignore_errors=True)
    print("input form (same cohort)         :   per patient    per image   (images = slices or frames; "
          f"median of {runs}, forms alternating)")
    base = names[0]
    for name in names:
        patients, images = counts[name]
        m = statistics.median(wall[name])
        rw = statistics.median(w / b * counts[base][1] / max(images, 1) for w, b in zip(wall[name], wall[base]))
        rc = statistics.median(c / b * counts[base][1] / max(images, 1) for c, b in zip(cpu[name], cpu[base]))
        ph = ", ".join(f"{k} {1000 * statistics.median(v) / max(patients, 1):.0f}" for k, v in phases[name].items())
        print(f"  {name:<31}: {1000 * m / max(patients, 1):8.1f} ms {1e6 * m / max(images, 1):9.0f} us   "
              f"x{rw:.2f} wall, x{rc:.2f} CPU of classic per image ({patients} patients, {images} images, "
              f"CPU {statistics.median(cpu[name]):.2f} s; ms per patient: {ph})")


def _dwi_reads(site: Path) -> tuple[float, int]:
    """Seconds to read every patient's DWI (trace) and ADC volumes, and the images read (slices / tiles)."""
    from client.dicom_scan import list_files, scan_files
    from client.series import SeriesRules, group_series, select_sequences
    from client.volumes import read_diffusion, read_volume

    records = [r for _, recs, _ in scan_files([p for p, _, _ in list_files(site / "dicom")]) if recs for r in recs]
    rules, images, t = SeriesRules(), 0, 0.0
    for series in group_series(records).values():
        sel = select_sequences(series, rules)
        t0 = time.perf_counter()
        read_diffusion(sel.dwi_files, "dwi", sel.dwi_b)
        if sel.adc_files:
            read_volume(sel.adc_files, "adc")
        t += time.perf_counter() - t0
        images += len(sel.dwi_files) + len(sel.adc_files or [])
    return t, images


def _mosaic(tmp: Path, classic: Path, cfg: dict, runs: int) -> None:
    """The Siemens site as classic slices and as mosaic DWI / ADC: prepare per image and DWI + ADC read per
    image, the two exports alternating within each run (order reversed every other run), ratio within a run."""
    from client.prepare import prepare_site
    from simulation.synth import generate_cohort

    mosaic = tmp / "mosaic"
    generate_cohort(mosaic, preset="tiny", seed=0, progress=False, export="mosaic")
    sites = {"classic": None, "mosaic": None}
    for s in _sites(mosaic):  # the site(s) whose scanner exports mosaics
        rep = prepare_site(s, tmp / "mosaic-probe" / s.name, cfg, progress=False)
        if any("dwi=mosaic" in k for k in rep.input_forms):
            sites = {"classic": classic / s.name, "mosaic": s}
            break
    shutil.rmtree(tmp / "mosaic-probe", ignore_errors=True)
    if sites["mosaic"] is None:
        print("mosaic vs classic: no site of the cohort exports mosaics (no SIEMENS scanner profile)")
        return
    wall: dict[str, list[float]] = {n: [] for n in sites}
    reads: dict[str, list[float]] = {n: [] for n in sites}
    counts: dict[str, tuple[int, int]] = {}
    for r in range(runs + 1):  # run 0 warms the file cache and the imports, and is not counted
        for name in (list(sites) if r % 2 else list(sites)[::-1]):
            t = time.perf_counter()
            rep = prepare_site(sites[name], tmp / f"mosaic{r}" / name, cfg, progress=False)
            w = time.perf_counter() - t
            rt, n_read = _dwi_reads(sites[name])
            if r:
                wall[name].append(w / max(rep.dicom_files, 1))
                reads[name].append(rt / max(n_read, 1))
            counts[name] = (rep.dicom_files, n_read)
            shutil.rmtree(tmp / f"mosaic{r}", ignore_errors=True)
    rw = statistics.median(m / c for m, c in zip(wall["mosaic"], wall["classic"]))
    rr = statistics.median(m / c for m, c in zip(reads["mosaic"], reads["classic"]))
    print(f"mosaic vs classic ({sites['mosaic'].name}; median of {runs}, exports alternating; target <= 1.1):")
    for name in sites:
        print(f"  {name:<8}: prepare {1e6 * statistics.median(wall[name]):7.0f} us per image ({counts[name][0]} images), "
              f"DWI + ADC read {1e6 * statistics.median(reads[name]):6.0f} us per image ({counts[name][1]} images)")
    print(f"  mosaic / classic per image: prepare x{rw:.2f}, DWI + ADC read x{rr:.2f}"
          f"   ({'met' if max(rw, rr) <= 1.1 else 'NOT met'})")


def _cpu() -> float:
    """CPU seconds of this process plus its reaped children (the prepare workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run(args) -> int:
    from client.prepare import prepare_site
    from common.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        if args.data:
            data = Path(args.data)
        else:
            from simulation.synth import generate_cohort

            data = tmp / "cohort"
            generate_cohort(data, preset="tiny", seed=0)
        sites = _sites(data)
        files = sorted(p for s in sites for p in (s / "dicom").rglob("*") if p.is_file())
        n_dicom = _parse_all(files)  # warm-up: both measurements see a warm file cache
        parse, first, rerun, patients, phases = [], [], [], 0, {}
        parse_cpu, first_cpu = [], []
        cfg = load_config(cli={"workers": args.workers})
        for r in range(args.runs):
            t, c = time.perf_counter(), _cpu()
            _parse_all(files)
            parse.append(time.perf_counter() - t)
            parse_cpu.append(_cpu() - c)
            t, c = time.perf_counter(), _cpu()
            patients = 0
            for s in sites:
                rep = prepare_site(s, tmp / f"run{r}" / s.name, cfg, progress=False)
                patients += rep.included
                for k, v in rep.timings.items():
                    phases.setdefault(k, []).append(v)
            first.append(time.perf_counter() - t)
            first_cpu.append(_cpu() - c)
            t = time.perf_counter()
            for s in sites:
                rep = prepare_site(s, tmp / f"run{r}" / s.name, cfg, progress=False)
                assert rep.redone == 0, "a re-run with nothing changed rebuilt patients"
            rerun.append(time.perf_counter() - t)
            shutil.rmtree(tmp / f"run{r}", ignore_errors=True)
        mp, mf, mr = statistics.median(parse), statistics.median(first), statistics.median(rerun)
        print(f"data: {data} ({len(sites)} site(s), {n_dicom} DICOM files, {patients} patients included)")
        pc, fc = statistics.median(parse_cpu), statistics.median(first_cpu)
        print(f"pydicom parse of every file once : {mp:8.3f} s  ({n_dicom / mp:,.0f} files/s; CPU {pc:.2f} s)   "
              f"median of {args.runs}")
        print(f"prepare --workers {args.workers}              : {mf:8.3f} s  ({patients / mf:.2f} patients/s; "
              f"CPU {fc:.2f} s in all processes)")
        print("prepare phases (s, median per site-run)  : "
              + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in phases.items()))
        print(f"prepare / parse                  : {mf / mp:8.2f} x wall   (target <= 2.0)   "
              f"{fc / pc:.2f} x CPU")
        print(f"machine load (1 min)             : {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
              "(a busy machine starves the workers: compare CPU when load > CPUs)")
        print(f"re-run, nothing changed          : {mr:8.3f} s  ({100 * mr / mf:.1f} % of first run, target < 10 %)")
        if not args.data and not args.no_forms:
            _forms(tmp, data, cfg, args.runs)
        if not args.data and args.mosaic:
            _mosaic(tmp, data, cfg, args.runs)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
