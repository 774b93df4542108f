"""`slmfed site sync-policy --bundle DIR`: bundle.toml is the one place a site edits its settings.

Why: the site's privacy policy ([privacy], e.g. k = min-cell-size) reaches the ClientApp only through
the SuperNode's --node-config, which is written out in the systemd unit and the compose file so that
a privacy officer reviews what runs. After editing bundle.toml, this rewrites exactly those SuperNode
commands from it (with deploy.bundle.site_argv, the builder `deploy init` and `site join` use), so a
changed k is edited once, not in three files. Nothing else in the files changes; `deploy check`
then finds them equal.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from deploy import bundle as B
from deploy.render import compose_command, systemd_exec

UNIT = "flower-supernode.service"
COMPOSE = "compose.yaml"
EXEC_START = re.compile(r"^ExecStart=(?:[^\n]*\\\n)*[^\n]*$", re.M)
COMMAND_BLOCK = re.compile(r"^(    command:\n)((?:      - [^\n]*\n)+)", re.M)


def _unit_text(text: str, bundle: B.Bundle) -> str:
    m = EXEC_START.search(text)
    if m is None:
        raise B.BundleError(f"{bundle.root / UNIT}: no ExecStart line")
    old = shlex.split(re.sub(r"\\\n", " ", m.group(0)[len("ExecStart="):]))
    program = old[0] if old else f"{B.DEFAULT_VENV}/bin/flower-supernode"
    new = "ExecStart=" + systemd_exec(B.site_argv(bundle), program)
    return text[:m.start()] + new + text[m.end():]


def _compose_text(text: str, bundle: B.Bundle) -> str:
    for m in COMMAND_BLOCK.finditer(text):
        items = [json.loads(line.strip()[2:]) for line in m.group(2).splitlines()]
        if items and Path(str(items[0])).name == "flower-supernode":
            argv = B.site_argv(bundle, runtime_host="0.0.0.0", program=str(items[0]))
            return text[:m.start(2)] + compose_command(argv) + "\n" + text[m.end(2):]
    raise B.BundleError(f"{bundle.root / COMPOSE}: no flower-supernode command block")


def sync_site(bundle_dir: str | Path) -> list[Path]:
    """Rewrite the SuperNode command of the unit and compose file from bundle.toml; the files changed."""
    bundle = B.read_bundle(bundle_dir)
    if bundle.kind != "site":
        raise B.BundleError(f"{bundle.root}: expected a site bundle, found a {bundle.kind} bundle")
    problems = B.privacy_problems(B.site_privacy(bundle))
    if problems:
        raise B.BundleError(f"{bundle.root / B.BUNDLE_FILE}: " + "; ".join(problems))
    changed = []
    for name, fn in ((UNIT, _unit_text), (COMPOSE, _compose_text)):
        path = bundle.root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        new = fn(text, bundle)
        if new != text:
            from common.atomic import atomic_write_text

            atomic_write_text(path, new)
            changed.append(path)
    return changed
