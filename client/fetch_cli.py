"""`slmfed fetch SITE_DIR --worklist patients.csv [--pacs NAME]`: the site's PACS into its site folder.

Why its own module: argparse only; the work is in client/fetch.py. Connection settings come from
site.toml's [pacs] table, secrets from the file it names (never from the command line).
"""
from __future__ import annotations

import sys
from pathlib import Path

from common.cli import CommandError


def register(sub) -> None:
    p = sub.add_parser("fetch", help="pull the worklist's MR exams (and SEG / RTSTRUCT masks) from the site's PACS",
                       description=__doc__)
    p.add_argument("site_dir", metavar="SITE_DIR", help="the site folder (dicom/ and masks/ are filled)")
    p.add_argument("--worklist", required=True, metavar="CSV",
                   help="patient_id, pacs_patient_id and/or accession, optional date_from, date_to, pacs")
    p.add_argument("--pacs", metavar="NAME", help="the [pacs.NAME] table used for rows without a pacs column "
                                                  "(default: the only one configured)")
    p.add_argument("--config", metavar="SITE_TOML", help="site.toml (default: SITE_DIR/site.toml)")
    p.add_argument("--all-series", action="store_true",
                   help="take every series of the study (default: only T2WI, DWI, ADC candidates and masks)")
    p.add_argument("--log", metavar="JSONL", help="machine-readable log (default: SITE_DIR/fetch-log.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_fetch)


def run_fetch(args) -> int:
    from client import fetch
    from client.series import RulesError, SeriesRules
    from common.config import ConfigError as SchemaError
    from common.config import read_toml

    site = Path(args.site_dir)
    toml = Path(args.config) if args.config else site / "site.toml"
    try:
        pacs = fetch.parse_pacs(fetch.read_pacs_table(toml), site, str(toml))
        rules = SeriesRules(read_toml(toml).get("series-rules", {}))
        worklist = fetch.read_worklist(args.worklist)
    except (fetch.ConfigError, RulesError, SchemaError) as exc:
        raise CommandError(str(exc)) from None
    if args.pacs and args.pacs not in pacs:
        raise CommandError(f"--pacs {args.pacs}: no such table in {toml} (configured: {', '.join(sorted(pacs))})")
    default = args.pacs or (next(iter(pacs)) if len(pacs) == 1 else "")
    if not default and any(not w.pacs for w in worklist):
        raise CommandError(f"{toml} configures {len(pacs)} PACS ({', '.join(sorted(pacs))}): say which with --pacs "
                           "or a pacs column in the worklist")
    log = Path(args.log) if args.log else site / fetch.LOG_NAME
    report = fetch.fetch_site(site, worklist, pacs, default, rules, all_series=args.all_series,
                              progress=not args.no_progress and sys.stderr.isatty(), log_path=log,
                              echo=lambda line: print(line, flush=True))
    print(report.table())
    print(f"log: {log}")
    return 1 if report.counts()["failed"] else 0
