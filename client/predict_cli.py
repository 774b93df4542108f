"""`slmfed predict --model RUN_DIR/models/final.json SITE_DIR_or_PATIENT_DIR --out DIR`: the final
models applied at the site, a risk report per patient and a worklist. Runs offline; sends nothing."""
from __future__ import annotations

import sys
from pathlib import Path

from common.cli import CommandError
from common.config import ConfigError, load_config


def register(sub) -> None:
    p = sub.add_parser("predict", help="apply the study's final models to a site's patients (reports stay at the site)",
                       description=__doc__)
    p.add_argument("input", metavar="SITE_DIR_or_PATIENT_DIR",
                   help="a site folder (dicom/, masks/, clinical.csv; slm optional) or one patient's folder "
                        "(clinical.csv with one row, mask.nii.gz, DICOM files)")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="RUN_DIR/models/final.json (or RUN_DIR, or RUN_DIR/models/<fit>) from the study")
    p.add_argument("--out", required=True, metavar="DIR", help="where the reports, worklist.csv and the prepared inputs go")
    p.add_argument("--patient", action="append", metavar="ID", help="only this patient_id (repeatable)")
    p.add_argument("--config", metavar="SITE_TOML", help="site.toml (default: SITE_DIR/site.toml when present)")
    p.add_argument("--workers", type=int, help="parallel worker processes for the preparation")
    p.add_argument("--no-attention", action="store_true", help="skip the Grad-CAM attention maps")
    p.add_argument("--allow-out-of-range", action="store_true",
                   help="assign a risk group even to patients whose clinical inputs lie outside the development "
                        "range (default: none, and the report says why)")
    p.set_defaults(func=run)


def run(args) -> int:
    from client.predict import MODEL_LABEL, PredictError, load_bundle, run_predict

    site = Path(args.input)
    toml = Path(args.config) if args.config else (site / "site.toml" if (site / "site.toml").is_file() else None)
    try:
        cfg = load_config(toml_path=toml, cli={"workers": args.workers})
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    try:
        bundle = load_bundle(args.model)
        print(bundle.identity())
        results = run_predict(bundle, site, args.out, patients=args.patient, cfg=cfg,
                              attention=not args.no_attention, progress=sys.stderr.isatty(),
                              allow_out_of_range=args.allow_out_of_range)
    except PredictError as exc:
        raise CommandError(str(exc)) from None
    t = bundle.meta["thresholds"].get("combined")
    print(f"\n{'patient_id':<16} " + " ".join(f"{MODEL_LABEL[m]:>18}" for m in bundle.models)
          + (f"  Combined risk group (threshold {t:.2f})" if t is not None else ""))
    for r in results:
        if r.status != "predicted":
            print(f"{r.patient_id:<16} not predicted: {r.reason}")
            continue
        print(f"{r.patient_id:<16} " + " ".join(f"{r.probs[m]:>18.3f}" for m in bundle.models) + f"  {r.risk_group}"
              + ("  [out of range: see report]" if r.warnings else ""))
        for w in r.warnings:
            print(f"{'':<16} warning: {w}")
    out = Path(args.out)
    print(f"\nworklist: {out / 'worklist.csv'}; reports: {out / 'reports'}")
    return 0 if any(r.status == "predicted" for r in results) else 1
