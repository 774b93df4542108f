"""The study's view of Flower's Grid: send a request to some sites, collect their replies.

Why not `grid.send_and_receive` as it is: in a deployment the ServerApp gets Flower 1.42's HttpGrid,
which pushes the messages, pulls once and then sleeps a literal 3 s between pulls
(flwr/superlink/grid/http_grid.py). No reply is ever there at the first pull, so every request of
the study waited at least 3 s for nothing. Flower's simulation grid (InMemoryGrid) runs the same loop
with a 0.1 s pull interval; `send_and_receive` here does that on any grid, with the grid's own push and pull calls,
so deployment and simulation wait for replies alike. Grids that deliver in-process (tests,
simulation/inprocess.py) have no push / pull: their own send_and_receive is used.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message

PULL_INTERVAL_S = 0.1  # as flwr's InMemoryGrid (the simulation runtime)


def has_push_pull(grid) -> bool:
    """Whether the grid is a transport (push / pull through a SuperLink) rather than an in-process double."""
    try:
        return callable(grid.push_messages) and callable(grid.pull_messages) and not getattr(grid, "in_process", False)
    except AttributeError:
        return False


def send_and_receive(grid, messages: Iterable[Message], timeout: float | None, *,
                     pull_interval_s: float = PULL_INTERVAL_S,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> list[Message]:
    """Push the messages, then pull their replies every `pull_interval_s` until each is in or
    `timeout` seconds have passed (None: wait for all). Returns the replies received."""
    if not has_push_pull(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    end = None if timeout is None else clock() + timeout
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting or (end is not None and clock() >= end):
            break
        sleep(pull_interval_s if end is None else max(0.0, min(pull_interval_s, end - clock())))
    return replies
