"""`slmfed site launcher`: the site's own app launcher; it runs only apps the site approved.

Why: OSS Flower's SuperNode installs and runs whatever app bundle (FAB) the coordinator sends, and its
`--trusted-entities` needs app verifications that only a platform SuperLink issues. With
`flower-supernode --isolation process` the SuperNode starts no app itself: it queues a task per
message on its Runtime API and waits for a launcher to take it. This is that launcher (in place of
Flower's `flower-superexec`). For each task it reads the app's FAB hash from the task (what the
SuperNode downloaded; the SuperNode hashes it) and
- the hash is in the site's allow-list (approved-apps.toml, `slmfed site approve`): it starts the
  ClientApp with Flower's own `run_clientapp` (the same code `flwr-clientapp` runs);
- any other hash: none of the app's code runs. The launcher itself answers the message with the error
  reply "app not approved at this site" (it pulls the message only to address the reply) and marks the
  task failed, so the refusal reaches the coordinator's ServerApp and its log.
Task hand-out is authenticated with the SuperNode's SuperExec secret (`--superexec-auth-secret-file`
on both), so no other local process can take the SuperNode's tasks.

Warm interpreter (the default; `--no-warm` for a fresh Python per message): ClientApps are forked
from a multiprocessing forkserver that imported torch, MONAI and Flower once, so a message no longer
pays those imports. The app's own modules are never preloaded: each task installs and imports the
approved FAB afresh, in its own process and its own FLWR_HOME (a new folder per task, removed when
the task ends), so one task cannot leave altered app files for the next (Flower reuses an installed
app folder as it finds it).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy import bundle as B
from deploy.task import APP_NOT_APPROVED_CODE, NOT_APPROVED, AppNotApproved, run_child  # noqa: F401

log = logging.getLogger("slmfed.launcher")
POLL_S = 0.2
# imported once in the forkserver: the expensive third-party modules, never the app's own code
WARM_MODULES = ["numpy", "torch", "monai", "flwr.supernode.runtime.run_clientapp", "flwr.clientapp",
                "flwr.serverapp"]


class LauncherError(RuntimeError):
    """The launcher cannot start as configured; the message names the file and the problem."""


def read_secret(path: str | Path) -> bytes:
    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise LauncherError(f"{path}: cannot read the SuperExec secret ({exc.strerror})") from None
    if not secret:
        raise LauncherError(f"{path}: the SuperExec secret is empty")
    return secret


def _runtime_client(address: str, secret: bytes | None = None, token: str | None = None):
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None else "flwr-clientapp")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker())


def refuse_task(address: str, token: str, fab_hash: str) -> None:
    """Answer the task's message with the error reply NOT_APPROVED; none of the app's code runs."""
    from flwr.app import Error, Message
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = _runtime_client(address, token=token)
    try:
        message, context, run, fab = pull_task_input(client)  # the FAB arrives as bytes; it is not installed
        reason = (f"{NOT_APPROVED}: app {run.fab_id} {run.fab_version} has SHA-256 {fab.hash_str}, "
                  "which this site's approved-apps.toml does not list")
        push_message(client, Message(Error(code=APP_NOT_APPROVED_CODE, reason=reason), reply_to=message), context)
        push_task_output(client, context, SubStatus.FAILED, reason)
    finally:
        client.close()


@dataclass
class Launcher:
    supernode: str                     # the SuperNode's Runtime API, host:port
    secret: bytes
    approved_file: Path
    warm: bool = True
    parent_pid: int | None = None      # exit when this process (the SuperNode) is gone
    children: list = field(default_factory=list)   # (process, its FLWR_HOME)
    launched: int = 0
    refused: int = 0

    def approved(self) -> dict[str, str]:
        """Re-read on every task: an approval takes effect without a restart; a broken file approves nothing."""
        try:
            return B.read_approved_apps(self.approved_file)
        except B.BundleError as exc:
            log.error("%s; refusing every app until it is fixed", exc)
            return {}

    def _start_warm(self) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(WARM_MODULES)

    def launch(self, token: str, approved: list[str]) -> None:
        root = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "tasks"
        root.mkdir(parents=True, exist_ok=True)
        home = tempfile.mkdtemp(prefix="task-", dir=root)
        args = (self.supernode, token, os.getpid(), home, approved)
        if self.warm:
            proc = self.ctx.Process(target=run_child, args=args, daemon=False)
            proc.start()
        else:  # a fresh Python per message (what flower-superexec does), same child code
            code = "import json,sys; from deploy.task import run_child; run_child(*json.loads(sys.argv[1]))"
            proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)],
                                    env={**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
        self.children.append((proc, home))
        self.launched += 1

    def reap(self) -> None:
        alive = []
        for proc, home in self.children:
            done = (proc.poll() is not None) if isinstance(proc, subprocess.Popen) else not proc.is_alive()
            if not done:
                alive.append((proc, home))
                continue
            if not isinstance(proc, subprocess.Popen):
                proc.join(0)
            # the task's installed app goes with it
            shutil.rmtree(home, onerror=lambda _f, path, exc: log.warning("could not remove %s: %s", path, exc[1]))
        self.children = alive

    def handle(self, token: str, fab_hash: str) -> str:
        approved = self.approved()
        if fab_hash in approved:
            log.info("app %s approved at this site: starting the ClientApp", fab_hash[:12])
            self.launch(token, sorted(approved))
            return "launched"
        log.warning("%s: app %s; replying with an error, none of its code runs", NOT_APPROVED, fab_hash)
        refuse_task(self.supernode, token, fab_hash)
        self.refused += 1
        return "refused"

    def run(self, stop: threading.Event | None = None) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        stop = stop or threading.Event()
        if self.warm:
            self._start_warm()
        client = _runtime_client(self.supernode, secret=self.secret)
        log.info("launcher: taking tasks from the SuperNode at %s; allow-list %s (%d app(s))",
                 self.supernode, self.approved_file, len(self.approved()))
        try:
            while not stop.is_set():
                if self.parent_pid is not None and not _alive(self.parent_pid):
                    log.info("launcher: the SuperNode (pid %d) is gone; stopping", self.parent_pid)
                    return
                self.reap()
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)],
                                                            agentapp_fab_hashes=[]))
                if res.HasField("task") and res.token:
                    try:
                        self.handle(res.token, res.task.fab_hash)
                    except Exception as exc:  # one bad task must not stop the site; it is logged with its cause
                        log.exception("launcher: task %s of run %s failed to start: %s",
                                      res.task.task_id, res.task.run_id, exc)
                    continue
                stop.wait(POLL_S)
        finally:
            client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"


def main(supernode: str, secret_file: str, approved: str, *, warm: bool = True, parent_pid: int | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per poll of the Runtime API
    launcher = Launcher(supernode=supernode, secret=read_secret(secret_file), approved_file=Path(approved),
                        warm=warm, parent_pid=parent_pid)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    launcher.run(stop)
    return 0


# ---------------------------------------------------------------- approving an app

def fab_hash_of(app: str | Path) -> tuple[str, str]:
    """(SHA-256, what was hashed) of a built .fab file or of an app folder built as `flwr run` builds it."""
    import hashlib

    path = Path(app)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest(), f"FAB file {path.name}"
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        try:
            data = build_fab_from_disk(path)
        except Exception as exc:  # flwr's own error names what is wrong with the app folder
            raise LauncherError(f"{path}: cannot be built as a Flower app ({exc})") from None
        return hashlib.sha256(data).hexdigest(), f"app folder {path.resolve()}"
    if B.FAB_HASH.match(str(app)):
        return str(app), "hash given"
    raise LauncherError(f"{app}: expected a .fab file, an app folder or a 64-digit SHA-256, found none of these")


def approve(allow_list: str | Path, app: str | Path, note: str = "", *, revoke: bool = False) -> str:
    """Add (or with revoke, remove) an app's hash in the site's allow-list, written atomically."""
    from common.atomic import atomic_write_text

    path = Path(allow_list)
    apps = B.read_approved_apps(path) if path.exists() else {}
    digest, what = fab_hash_of(app)
    if revoke:
        if apps.pop(digest, None) is None:
            raise LauncherError(f"{path}: app {digest} is not approved; nothing to revoke")
    else:
        apps[digest] = note or what
    atomic_write_text(path, B.approved_apps_text(apps))
    return digest
