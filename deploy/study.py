"""`slmfed deploy run`: submit the study with `flwr run --stream`, then fail loudly when it failed.

Why: `flwr run` exits 0 whatever became of the run (a ServerApp that raised, a study that ended with no
result). The researcher's command in the runbook is this one: it runs exactly `flwr run APP CONNECTION
--run-config ... --stream` (the output streams through unchanged), then asks the SuperLink how the run
ended (`flwr ls CONNECTION --run-id N --format json`) and, when the run folder is readable here (the
researcher runs on the coordinator), reads its results.json. The exit status is
  0  the run finished:completed and results.json holds at least one result row;
  1  the run failed or was stopped, flwr run itself failed, or results.json is missing or holds no row
     (e.g. every cohort too small at the sites' k: nothing could be released);
  2  the run completed but its run folder is not on this machine (an SSH tunnel): nothing to count here.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

STARTED = re.compile(r"Successfully started run (\d+)")
OK, FAILED, UNCHECKED = 0, 1, 2


@dataclass
class Outcome:
    code: int
    message: str
    run_id: int | None = None
    status: str = ""


def flwr_program() -> str:
    beside = Path(sys.executable).with_name("flwr")
    return str(beside) if beside.is_file() else "flwr"


def run_dir_of(run_config: list[str]) -> str | None:
    """The run-dir a --run-config sets (Flower's key=value syntax, TOML values), or None."""
    from flwr.common.config import parse_config_args

    try:
        cfg = parse_config_args(run_config)
    except Exception:  # flwr run reports a bad --run-config itself
        return None
    value = cfg.get("run-dir")
    return str(value) if value else None


def result_rows(run_dir: Path) -> tuple[int | None, str]:
    """(number of result rows, why not) of a run folder's results.json."""
    path = run_dir / "results.json"
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} does not exist: the study wrote no results"
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"{path}: cannot be read ({exc})"
    rows = res.get("rows")
    if not isinstance(rows, list):
        return None, f"{path}: holds no `rows` list"
    return len(rows), ""


def run_status(flwr: str, connection: str, run_id: int, env=None, cwd=None) -> tuple[str, str]:
    """(status, details) of one run as the SuperLink reports it, e.g. ("finished:failed", "...")."""
    res = subprocess.run([flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"],
                         capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    start = res.stdout.find("{")
    try:
        doc = json.loads(res.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        doc = {}
    runs = doc.get("runs") or []
    if res.returncode != 0 or not runs:
        return "unknown", f"`flwr ls --run-id {run_id}` failed (exit {res.returncode}): " \
                          f"{(res.stdout + res.stderr).strip()[-500:]}"
    run = runs[0]
    return str(run.get("status", "unknown")), str(run.get("status-details") or "")


def run_study(app: str, connection: str, run_config: list[str], *, flwr: str | None = None, env=None,
              cwd=None, out=None) -> Outcome:
    """flwr run ... --stream, then the run's status and its result rows; see the module docstring."""
    flwr = flwr or flwr_program()
    out = out or sys.stdout
    argv = [flwr, "run", app, connection, "--stream"]
    for item in run_config:
        argv += ["--run-config", item]
    run_id = None
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    assert proc.stdout is not None
    for line in proc.stdout:  # stream through unchanged, remember the run id
        out.write(line)
        out.flush()
        m = STARTED.search(line)
        if m and run_id is None:
            run_id = int(m.group(1))
    code = proc.wait()
    if code != 0:
        return Outcome(FAILED, f"flwr run failed (exit {code}); nothing was run or the stream broke off", run_id)
    if run_id is None:
        return Outcome(FAILED, "flwr run printed no run id (\"Successfully started run N\"): the run did not start")
    status, details = run_status(flwr, connection, run_id, env=env, cwd=cwd)
    if status != "finished:completed":
        why = f" ({details})" if details else ""
        return Outcome(FAILED, f"run {run_id} ended as {status}{why}; the ServerApp's log is the stream above "
                               f"(again: flwr log {run_id} {connection} --show)", run_id, status)
    run_dir = run_dir_of(run_config)
    if run_dir is None:
        return Outcome(UNCHECKED, f"run {run_id} completed, but --run-config sets no run-dir: its results cannot be "
                                  "checked here", run_id, status)
    folder = Path(run_dir) if Path(run_dir).is_absolute() or cwd is None else Path(cwd) / run_dir
    if not folder.is_dir():
        return Outcome(UNCHECKED, f"run {run_id} completed; its run folder {run_dir} is not on this machine (run "
                                  "this command on the coordinator to have the results counted)", run_id, status)
    rows, why = result_rows(folder)
    if rows is None:
        return Outcome(FAILED, f"run {run_id} completed but {why}", run_id, status)
    if rows == 0:
        return Outcome(FAILED, f"run {run_id} completed with 0 result rows in {folder / 'results.json'}: no model "
                               "could be evaluated on any cohort. Usually a cohort is too small for a site's k "
                               "(min-cell-size: each class needs at least k patients in every fold and partition "
                               "a site releases), or every site refused (see the refusals in the log above and "
                               "report.md's 'not computed' lines)", run_id, status)
    return Outcome(OK, f"run {run_id} completed: {rows} result row(s) in {folder / 'results.json'}", run_id, status)
