"""The `slmfed` console command.

Each package owns its subcommands and registers them through the `slmfed.commands` entry-point
group in pyproject.toml, so this dispatcher never imports client/server/simulation/deploy itself.
A registration is a function `register(subparsers)` that adds one or more subparsers and sets
`func` (called with the parsed namespace, returns an exit code) as a default.
"""
from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from common import __version__


class CommandError(Exception):
    """An error meant for the user: printed as one clear sentence, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slmfed",
        description=(
            "SLM-Fed: federated prediction of synchronous liver metastases (SLM) in rectal cancer "
            "from multiparametric MRI + clinical factors (Sun et al., BMC Med Imaging 2025)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"slmfed {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="slmfed.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"slmfed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    # `python -m common.cli`: run the imported module's main, so that the CommandError the subcommands
    # raise (common.cli.CommandError) is the class caught there, not a second copy in __main__
    from common.cli import main as _main

    sys.exit(_main())
