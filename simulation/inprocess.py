"""A Flower Grid that hands each message straight to a ClientApp in this process.

Why: the study protocol (server/protocol.py) and the real ClientApp can then run where Ray cannot
(a GPU machine without the simulation extras, a benchmark that must not fork a cluster), with the
same messages, validation and replies as in `slmfed simulate`. Only the transport differs. Every
reply is kept in `replies` so callers can inspect exactly what left each site.
"""
from __future__ import annotations

import itertools

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.simulated import signer_name, with_simulation_keys


class InProcessGrid(Grid):
    """Nodes 1000, 1001, ... with the given node configs; one shared run config. With `study_config`
    (the study's settings) the nodes are the caller's virtual sites: their max-partitions is raised to
    fit its repeated cross-validation (simulation/runner.py size_for_repeats); without it every node
    keeps exactly the policy it was given (tests of a site's own refusals)."""

    in_process = True  # delivers in send_and_receive itself (server/grid.py: no push / pull to poll)

    def __init__(self, client_app, node_configs: list[dict], run_config: dict | None = None,
                 study_config: dict | None = None, keep_messages: bool = True):
        if study_config is not None:
            from simulation.runner import size_for_repeats

            node_configs = size_for_repeats(node_configs, study_config)
        self.client_app = client_app
        # sites without keys of their own get the simulation's (they trust each other, client/simulated.py)
        names = [signer_name(c) for c in node_configs]
        self.nodes = {1000 + i: (with_simulation_keys(dict(cfg), names) if cfg.get("cache-dir") else cfg)
                      for i, cfg in enumerate(node_configs)}
        self.run_config = run_config or {}
        # every message, for tests that inspect what left a site; a benchmark running whole studies turns
        # this off (a study at width 1 with repeats sends gigabytes of weights)
        self.keep_messages = keep_messages
        self.replies: list[tuple[str, Message]] = []  # (message_type, reply)
        self.sent: list[Message] = []
        self._ids = itertools.count()
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config=dict(self.nodes[node]), state=RecordDict(),
                          run_config=dict(self.run_config))
            reply = self.client_app(msg, ctx)
            if self.keep_messages:
                self.sent.append(msg)
                self.replies.append((msg.metadata.message_type, reply))
            out.append(reply)
        return out

    # not used by the study protocol
    def set_run(self, run):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def get_nodes(self):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError
