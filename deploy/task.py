"""One ClientApp task at a site, run by the site's launcher (deploy/launcher.py) in its own process.

Why a module of its own: it imports only the standard library and Flower, never SLM-Fed's packages,
so the ClientApp that Flower then loads from the approved app bundle (FAB) imports all of its own
code (client/, common/, ...) from that bundle, exactly as `flwr-clientapp` would, and not a copy
already imported from the site's installation.
"""
from __future__ import annotations

import hashlib
import os
import sys

NOT_APPROVED = "app not approved at this site"
APP_NOT_APPROVED_CODE = 4003  # error code of the refusal reply (SITE_REFUSED is 4001, SITE_CANNOT 4002)
APP_PACKAGES = ("client", "common", "server", "simulation")  # the app's own top-level packages


class AppNotApproved(RuntimeError):
    """The app bundle a ClientApp process received is not one the site approved."""


def checked_pull(original, approved: frozenset[str]):
    """Flower's pull_task_input, then a check of the FAB bytes themselves before anything is installed:
    their SHA-256 must be the hash the task announced and one the site approved. On a mismatch the
    message gets the refusal reply and the process stops before installing or importing the app."""
    from flwr.app import Error, Message
    from flwr.supernode.runtime.run_clientapp import push_message

    def pull(client):
        message, context, run, fab = original(client)
        actual = hashlib.sha256(fab.content).hexdigest()
        if actual != fab.hash_str or actual not in approved:
            reason = (f"{NOT_APPROVED}: the app bundle received has SHA-256 {actual} (announced as {fab.hash_str}), "
                      "which this site's approved-apps.toml does not list")
            push_message(client, Message(Error(code=APP_NOT_APPROVED_CODE, reason=reason), reply_to=message), context)
            raise AppNotApproved(reason)
        return message, context, run, fab
    return pull


def run_child(address: str, token: str, parent_pid: int, home: str, approved: list[str]) -> None:
    """In a forked (warm) or fresh process: Flower's own ClientApp runner, no dependency installs, the
    task's own FLWR_HOME (where the FAB gets installed), the FAB's bytes checked before installation."""
    from flwr.supernode.runtime import run_clientapp as rc

    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
        del sys.modules[name]  # nothing of the app may come from anywhere but its bundle
    os.environ["FLWR_HOME"] = home
    rc.pull_task_input = checked_pull(rc.pull_task_input, frozenset(approved))
    rc.run_clientapp(runtime_api_address=address, token=token, insecure=True, certificates=None,
                     parent_pid=parent_pid, runtime_dependency_install=False)
