"""One `slmfed prepare` at a time per cache: an exclusive, non-blocking lock on CACHE_DIR/.prepare.lock.

Why: two runs writing the same cache would interleave manifests and patient files. The lock is an
fcntl (flock) lock, so the kernel drops it when its holder exits, crash or SIGKILL included: a stale
lock file never blocks the next run. The file records the holder (host, PID, start time) for the
refusal message only.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".prepare.lock"


class CacheLocked(RuntimeError):
    """Another process is preparing this cache."""


@contextlib.contextmanager
def cache_lock(cache_dir: str | Path) -> Iterator[None]:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise CacheLocked(f"cache {cache_dir} is being prepared by {holder}: wait until that `slmfed prepare` "
                              f"finishes (the lock {path} is released when it exits), then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
