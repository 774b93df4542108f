"""`slmfed prepare SITE_DIR --cache CACHE_DIR`: the site's one-off data preparation command."""
from __future__ import annotations

import sys
from pathlib import Path

from common.cli import CommandError
from common.config import ConfigError, load_config


def register(sub) -> None:
    p = sub.add_parser("prepare", help="turn a site folder (dicom/, masks/, clinical.csv) into a checked cache")
    p.add_argument("site_dir", metavar="SITE_DIR", help="site folder with dicom/, masks/, clinical.csv")
    p.add_argument("--cache", required=True, metavar="CACHE_DIR", help="where to write the prepared cache")
    p.add_argument("--config", metavar="SITE_TOML", help="site.toml (default: SITE_DIR/site.toml when present)")
    p.add_argument("--workers", type=int, help="parallel worker processes (config key workers)")
    p.add_argument("--input-mode", choices=("2d", "2.5d", "3d"), help="model input (config key input-mode)")
    p.add_argument("--rigid-refine", action="store_true", default=None,
                   help="refine the DWI/ADC alignment with a rigid registration (config key rigid-refine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from client.prepare import PrepareError, prepare_site

    site = Path(args.site_dir)
    toml = Path(args.config) if args.config else (site / "site.toml" if (site / "site.toml").is_file() else None)
    try:
        cfg = load_config(toml_path=toml, cli={"workers": args.workers, "input-mode": args.input_mode,
                                                 "rigid-refine": args.rigid_refine})
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    try:
        report = prepare_site(site, args.cache, cfg, progress=not args.no_progress and sys.stderr.isatty())
    except PrepareError as exc:
        raise CommandError(str(exc)) from None
    print(report.summary())
    if report.included == 0:
        top = max(report.reasons.items(), key=lambda kv: kv[1])[0] if report.reasons else "none found"
        print(f"slmfed prepare: error: no usable patient in {site} ({report.patients} found; "
              f"most common exclusion: {top}); see {Path(args.cache) / 'qc.csv'}", file=sys.stderr)
        return 1
    return 0
