"""One writer per run directory: an OS file lock plus a holder record with a heartbeat.

Two processes writing one run directory interleave their metric records and checkpoints (a double
submission, or a requeued job whose first instance still runs). :class:`RunLock` makes the second
one fail fast with a message naming the holder:

* ``<run>/.lock`` is held with :class:`filelock.FileLock` (``flock``) for the life of the run;
  the OS releases it when the process dies, however it dies;
* ``<run>/.lock.json`` records the holder (host, pid, start time) and a heartbeat refreshed while
  the run makes progress. ``flock`` is not enforced between hosts on every shared file system
  (NFS without a lock manager), so a process that obtains the OS lock still refuses a holder
  record of *another host* whose heartbeat is recent; such a record with an old heartbeat
  (``stale_after_s``), or one of this host (the OS lock proves its process gone), is stale: the
  new process reports it and takes over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.json"


class RunLockedError(RuntimeError):
    """Another process holds the run directory."""


def _describe(holder: dict[str, Any], now: float) -> str:
    beat = now - float(holder.get("heartbeat", holder.get("since", now)))
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}, "
        f"last heartbeat {beat:.0f} s ago)"
    )


class RunLock:
    """The writer's lock on a run directory.

    Args:
        directory: the run directory (created if needed).
        stale_after_s: a holder record of another host whose heartbeat is older than this is
            considered dead.
        heartbeat_every_s: :meth:`heartbeat` rewrites the holder record at most this often.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        stale_after_s: float = 900.0,
        heartbeat_every_s: float = 30.0,
    ) -> None:
        self.directory = Path(directory)
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_every_s = float(heartbeat_every_s)
        self._lock: FileLock | None = None
        self._last_beat = 0.0
        self._record: dict[str, Any] = {}

    @property
    def holder_path(self) -> Path:
        """``<run>/.lock.json``."""
        return self.directory / HOLDER_FILE

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock is not None and self._lock.is_locked

    def read_holder(self) -> dict[str, Any] | None:
        """The holder record, or ``None`` when there is none (or it is unreadable)."""
        try:
            return json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock, or raise.

        Raises:
            RunLockedError: if another live process holds the directory; the message names it
                and says what to do.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.directory / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self.read_holder() or {}
            raise RunLockedError(
                f"{self.directory} is in use by {_describe(holder, time.time())}: another "
                "launch of this run is still running. Wait for it to finish (or stop it); a "
                "second writer would corrupt its records."
            ) from None
        now = time.time()
        holder = self.read_holder()
        here = socket.gethostname()
        if holder is not None and holder.get("host") != here:
            beat = now - float(holder.get("heartbeat", 0.0))
            if beat < self.stale_after_s:
                lock.release()
                raise RunLockedError(
                    f"{self.directory} is in use by {_describe(holder, now)} (a shared file "
                    "system may not propagate file locks between hosts). If that process is "
                    f"dead, its record becomes stale {self.stale_after_s:.0f} s after its last "
                    f"heartbeat; or delete {self.holder_path} by hand."
                )
        if holder is not None:
            logger.warning(
                "%s: the previous writer %s ended without releasing its lock (killed or lost); "
                "taking over",
                self.directory,
                _describe(holder, now),
            )
        self._lock = lock
        self._record = {
            "host": here,
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "since": now,
        }
        self._write(now)

    def _write(self, now: float) -> None:
        record = {**self._record, "heartbeat": now}
        tmp = self.holder_path.with_name(HOLDER_FILE + ".tmp")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, self.holder_path)
        self._last_beat = now

    def heartbeat(self) -> None:
        """Refresh the holder record's heartbeat (at most every ``heartbeat_every_s``)."""
        now = time.time()
        if self.held and now - self._last_beat >= self.heartbeat_every_s:
            self._write(now)

    def release(self) -> None:
        """Remove the holder record and release the OS lock (no-op if not held)."""
        if not self.held:
            return
        try:
            self.holder_path.unlink(missing_ok=True)
        finally:
            assert self._lock is not None
            self._lock.release()
            self._lock = None
