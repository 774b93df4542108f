"""`slmfed deploy status [BUNDLE]`: what an operator needs to know, one line each.

Coordinator bundle: the SuperLink and the front door (their ports answer; with systemd, the units'
state), every site of the bundle with its node id from the site registry and whether the SuperLink
lists it online (`flwr supernode list`), and the last run with how it ended (`flwr ls`; with --run-dir
the result rows of that run folder). Whether a site approved the app is known only at the site: the
coordinator sees it as a refusal ("app not approved at this site", code 4003) in the run's log.
Site bundle: the SuperNode (its Runtime API port answers) and launcher (systemd state), whether the
coordinator's front door answers TLS with the deployment CA, the apps this site approved and its k.

Each line starts with "ok", "DOWN" or "info"; the exit status is 1 when a line says DOWN.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

from deploy import bundle as B


def _port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _systemd(units: list[str]) -> dict[str, str]:
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return {}
    res = subprocess.run(["systemctl", "is-active", *units], capture_output=True, text=True, timeout=30)
    return dict(zip(units, res.stdout.split()))


def _flwr_json(flwr: str, args: list[str], env=None) -> tuple[dict | None, str]:
    try:
        res = subprocess.run([flwr, *args, "--format", "json"], capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    start = res.stdout.find("{")
    try:
        doc = json.loads(res.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        doc = None
    if res.returncode != 0 or not isinstance(doc, dict) or not doc.get("success", True):
        return None, (res.stdout + res.stderr).strip()[-300:] or f"exit {res.returncode}"
    return doc, ""


def _line(ok: bool | None, text: str) -> str:
    return f"{'info' if ok is None else 'ok  ' if ok else 'DOWN'}  {text}"


def coordinator_status(bundle: B.Bundle, connection: str, registry: str | None, run_dir: str | None,
                       flwr: str, env=None) -> list[str]:
    link = bundle.data.get("superlink", {})
    out = []
    for unit, state in _systemd(["flower-superlink", "nginx"]).items():
        out.append(_line(state == "active", f"systemd unit {unit}: {state}"))
    internal = (str(link.get("internal-host", B.INTERNAL_HOST)), int(link.get("internal-port", B.DEFAULT_INTERNAL_PORT)))
    out.append(_line(_port_open(*internal), f"SuperLink on {internal[0]}:{internal[1]} "
                                            f"{'answers' if _port_open(*internal) else 'does not answer'}"))
    bind = str(link.get("bind-host", "0.0.0.0"))
    door = ("127.0.0.1" if bind in ("0.0.0.0", "::") else bind, int(link.get("port", B.DEFAULT_SUPERLINK_PORT)))
    up = _port_open(*door)
    out.append(_line(up, f"front door (nginx) on {door[0]}:{door[1]} {'answers' if up else 'does not answer'}"))
    reg_path = Path(registry or bundle.data.get("sites", {}).get("registry", ""))
    recorded: dict[str, int] = {}
    try:
        doc = tomllib.loads(reg_path.read_text(encoding="utf-8"))
        recorded = {name: int(e["node-id"]) for name, e in (doc.get("sites") or {}).items()}
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        out.append(_line(False, f"site registry {reg_path}: cannot be read ({exc}); run register-sites.sh"))
    nodes, why = _flwr_json(flwr, ["supernode", "list", connection], env=env)
    online = {}
    if nodes is None:
        out.append(_line(False, f"`flwr supernode list {connection}` failed: {why}"))
    else:
        online = {int(n["node-id"]): str(n.get("status", "?")) for n in nodes.get("nodes", [])}
    for name in bundle.data.get("sites", {}).get("names", []):
        node = recorded.get(name)
        if node is None:
            out.append(_line(False, f"site {name}: not recorded in the site registry (not registered)"))
        elif nodes is not None:
            state = online.get(node, "not listed by the SuperLink")
            out.append(_line(state == "online", f"site {name}: node {node} {state}"))
    for node, state in sorted(online.items()):
        if node not in recorded.values():
            out.append(_line(None, f"node {node} ({state}) is registered but no recorded site: never enrolled"))
    out.append(_line(None, "app approval is each site's own (`slmfed deploy status /etc/slmfed` there); a site "
                           "that did not approve the app answers code 4003 'app not approved at this site'"))
    runs, why = _flwr_json(flwr, ["ls", connection], env=env)
    if runs is None:
        out.append(_line(False, f"`flwr ls {connection}` failed: {why}"))
    elif not runs.get("runs"):
        out.append(_line(None, "no run yet"))
    else:
        last = max(runs["runs"], key=lambda r: int(r.get("run-id", 0)))
        status = str(last.get("status"))
        ok = None if status in ("pending", "starting", "running") else status == "finished:completed"
        details = f" ({last['status-details']})" if last.get("status-details") else ""
        out.append(_line(ok, f"last run {last.get('run-id')}: {status}{details}, elapsed {last.get('elapsed', '?')}"))
    if run_dir:
        from deploy.study import result_rows

        rows, why = result_rows(Path(run_dir))
        out.append(_line(bool(rows), f"run folder {run_dir}: " + (why if rows is None else f"{rows} result row(s)")))
    return out


def site_status(bundle: B.Bundle) -> list[str]:
    from deploy.join import preflight_tls

    node = bundle.data.get("node", {})
    out = []
    for unit, state in _systemd(["flower-supernode", "slmfed-launcher"]).items():
        out.append(_line(state == "active", f"systemd unit {unit}: {state}"))
    port = int(node.get("port", B.DEFAULT_SUPERNODE_PORT))
    up = _port_open("127.0.0.1", port)
    out.append(_line(up, f"SuperNode Runtime API on 127.0.0.1:{port} {'answers' if up else 'does not answer'}"))
    address = str(bundle.data.get("superlink", {}).get("address", ""))
    try:
        warning = preflight_tls(address, bundle.root / B.CA_CERT, timeout=5.0)
        out.append(_line(warning is None, f"coordinator {address}: " + (warning or "answers TLS with the deployment CA")))
    except Exception as exc:  # JoinError: a certificate the CA does not vouch for
        out.append(_line(False, f"coordinator {address}: {exc}"))
    allow = bundle.root / B.APPROVED_APPS
    try:
        apps = B.read_approved_apps(allow) if allow.exists() else {}
        if not apps:
            out.append(_line(False, f"{allow}: no approved app, every study is refused (slmfed site approve)"))
        for digest, note in sorted(apps.items()):
            out.append(_line(True, f"approved app {digest} ({note})"))
    except B.BundleError as exc:
        out.append(_line(False, str(exc)))
    privacy = bundle.data.get("privacy") or {}
    out.append(_line(None, f"k (min-cell-size) = {privacy.get('min-cell-size', 'default 10')}, "
                           f"share-histograms = {privacy.get('share-histograms', 'default true')}"))
    return out


def status(bundle_dir: str, *, connection: str = "slmfed", registry: str | None = None, run_dir: str | None = None,
           flwr: str | None = None, env=None) -> tuple[list[str], int]:
    from deploy.study import flwr_program

    try:
        bundle = B.read_bundle(bundle_dir)
    except B.BundleError as exc:
        return [_line(False, str(exc))], 1
    lines = (coordinator_status(bundle, connection, registry, run_dir, flwr or flwr_program(), env=env)
             if bundle.kind == "coordinator" else site_status(bundle))
    return lines, int(any(line.startswith("DOWN") for line in lines))
