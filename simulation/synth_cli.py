"""`slmfed synth`: write the synthetic two-center (or N-site) MRI cohort; see simulation/synth."""
from __future__ import annotations

import time
from pathlib import Path

from common.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="generate the synthetic two-center MRI cohort",
        description="Write DICOM + masks + clinical.csv site folders and truth.json (true risks, oracle AUCs).",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, empty, or a previous cohort)")
    p.add_argument("--preset", choices=("paper", "small", "tiny"), default="paper",
                   help="paper: 176 + 31 patients; small: 28 + 12; tiny: 8 + 4 (test fixture)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, identical output)")
    p.add_argument("--sites", type=int, default=None, metavar="N",
                   help="split a larger population into N non-identically distributed hospitals site-01..site-NN")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes rendering patients (default 1; the output is the same for any N)")
    p.add_argument("--export", choices=("classic", "enhanced", "mosaic", "directional"), default="classic",
                   help="classic: one MR Image Storage file per slice; enhanced: one Enhanced MR multi-frame file "
                        "per series (geometry and b-values in the functional groups); mosaic: Siemens sites' DWI "
                        "and ADC as mosaics with a CSA header; directional: classic DWI with three gradient "
                        "directions and no trace, b-values in the vendors' private tags")
    p.add_argument("--masks", choices=("nifti", "seg", "rtstruct"), default="nifti",
                   help="tumour ROI as masks/<patient_id>.nii.gz, as a DICOM SEG in the exam folder, or as an "
                        "RTSTRUCT (contours in patient mm) in masks/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from simulation.synth import generate_cohort  # heavy imports only when the command runs

    t0 = time.perf_counter()
    try:
        summary = generate_cohort(args.out, preset=args.preset, seed=args.seed, sites=args.sites,
                                  progress=not args.no_progress, workers=args.workers, export=args.export,
                                  masks=args.masks)
    except (ValueError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    print(format_summary(summary, time.perf_counter() - t0))
    return 0


def format_summary(summary: dict, seconds: float | None = None) -> str:
    """Where the cohort went, patients per site, prevalence and oracle AUCs, as a small table."""
    sites = summary["sites"]
    root = summary["out_dir"]
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [
        f"wrote synthetic cohort to {root}{took} (preset {summary['preset']}, seed {summary['seed']}, "
        f"generator {summary['version']}); truth: {Path(root) / 'truth.json'}",
        "oracle AUC = AUC of the true P(SLM | information) on the centre's population "
        f"(targets clinical {summary['targets']['oracle_auc']['clinical']:.2f}, "
        f"image {summary['targets']['oracle_auc']['image']:.2f}, "
        f"combined {summary['targets']['oracle_auc']['combined']:.2f})",
        f"{'site':<16} {'patients':>8} {'SLM':>4} {'prevalence':>10}  {'oracle AUC clinical/image/combined':>34}  scanner",
    ]
    for name, s in sites.items():
        a = s["oracle_auc"]
        lines.append(
            f"{name:<16} {s['n']:>8} {s['n_slm']:>4} {s['prevalence']:>10.1%}  "
            f"{a['clinical']:>14.3f} /{a['image']:.3f} /{a['combined']:.3f}  {s['scanner']['key']}"
        )
    return "\n".join(lines)
