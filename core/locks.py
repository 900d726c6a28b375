"""One builder at a time for an output that several jobs may ask for at once (on one machine, or
on a filesystem whose locks all nodes share)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import Iterator

log = logging.getLogger("vidkd")


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block. When another process
    holds it, say so once and wait. The OS releases the lock of a process that dies, so a killed
    job never leaves one behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another job is building this on the same cache; waiting for it", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
