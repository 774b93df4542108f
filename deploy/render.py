"""Render the systemd units, compose files and scripts from deploy/templates/.

Why: the files a privacy officer reviews are plain text generated from one command line builder
(deploy.bundle), so what is reviewed is what runs.
"""
from __future__ import annotations

import json
import shlex
from importlib import resources
from string import Template


def template(name: str) -> Template:
    return Template(resources.files("deploy").joinpath("templates", name).read_text(encoding="utf-8"))


def render(name: str, **values) -> str:
    """Fill a template; a missing value is an error (KeyError names it), never a blank."""
    return template(name).substitute(**values)


def _pairs(argv: list[str]) -> list[list[str]]:
    """Group a flag with its value so each line of a rendered command reads as one setting."""
    out: list[list[str]] = [[argv[0]]]
    i = 1
    while i < len(argv):
        if argv[i].startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(argv[i : i + 2])
            i += 2
        else:
            out.append([argv[i]])
            i += 1
    return out


def systemd_exec(argv: list[str], program_path: str) -> str:
    """An ExecStart value, one flag per continued line; systemd accepts shell-style quotes."""
    lines = [" ".join(shlex.quote(t) for t in group) for group in _pairs([program_path, *argv[1:]])]
    return " \\\n    ".join(lines)


def compose_command(argv: list[str], indent: int = 6) -> str:
    """A compose `command:` list; JSON strings are valid YAML and need no further escaping."""
    return "\n".join(f"{' ' * indent}- {json.dumps(t)}" for t in argv)
