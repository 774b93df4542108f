"""The Flower ServerApp: reads the config, runs the study protocol, writes the run folder.

Thin on purpose: the protocol is server/protocol.py, the outputs server/report.py.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import app_config
from server.checkpoint import Checkpoint, StudyInterrupted
from server.protocol import Federation, Study
from server.registry import load_site_registry
from server.report import format_table, write_run_folder

log = logging.getLogger(__name__)
app = ServerApp()


class _Stdout(logging.Handler):
    """Our log lines on this process's stdout as it is at the time (Flower mirrors the ServerApp
    process's stdout into the run's log, which `flwr run --stream` and `flwr log` show)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stdout, flush=True)


def _log_to_flower() -> None:
    """Where nothing has configured logging (the ServerApp process a SuperLink starts), the study's
    progress would otherwise reach nobody: INFO and up of the server package go to stdout. Under
    `slmfed simulate` the root logger prints them already."""
    ours = logging.getLogger("server")
    if not logging.getLogger().handlers and not any(isinstance(h, _Stdout) for h in ours.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_flower()
    cfg = app_config(context.run_config)
    # sites are named by the coordinator's registry (deploy register-sites), when the run names one
    registered = load_site_registry(cfg["site-registry"]) if cfg["site-registry"] else None
    run_dir = Path(cfg["run-dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = Federation(grid, min_sites=int(cfg["min-sites"]), timeout_s=float(cfg["site-timeout-s"]),
                     retries=int(cfg["site-retries"]), backoff_s=float(cfg["retry-backoff-s"]), registered=registered)
    study = Study(fed, cfg, Checkpoint(run_dir))
    try:
        state = study.run()
    except StudyInterrupted as exc:
        log.warning("%s; resume with resume=true and the same run-dir (%s)", exc, run_dir)
        raise  # the run did not finish: Flower records it as failed (`flwr ls`), not completed
    except Exception as exc:  # e.g. the SuperLink restarted under the study: what is done is checkpointed
        log.error("the study failed (%s: %s); every completed round is checkpointed in %s: resume with run config "
                  "resume=true and the same run-dir", type(exc).__name__, exc, run_dir / "checkpoint")
        raise
    res = write_run_folder(run_dir, state, cfg)
    log.info("study %s finished: %s\n%s", state["study_id"], run_dir / "report.md", format_table(res))
