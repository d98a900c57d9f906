"""One trainer per run directory: an exclusive ``flock`` on ``<run_dir>/run.lock``, taken by rank 0 before anything
is written to the run directory and held until the process exits.

The lock file names its holder (host, pid, start time), so a second trainer is refused with one line that says
who holds it. ``flock`` is released by the kernel when the holder dies, so a crashed run leaves no lock behind;
the one exception is a child process that inherited the descriptor (a writer helper, a data worker) and
outlived its parent: a lock whose recorded holder is a dead pid on this host is stale, and is broken by
replacing the file. On a shared file system ``flock`` works across nodes where the file system supports it
(NFSv4, Lustre mounted with ``-o flock``, GPFS); the ranks on other nodes take no lock of their own, they wait
for rank 0's verdict (``train.main``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLockError(ValueError):
    """The run directory is held by another trainer, or cannot be written; one line."""


def unwritable(run_dir: Path, exc: OSError) -> RunLockError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return RunLockError(f"cannot write to the run directory {run_dir} ({reason}): choose a writable "
                        "logging.run_dir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(path: Path) -> dict | None:
    """The holder recorded in a lock file (None if empty or unreadable)."""
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """``RunLock(run_dir).acquire()`` ... ``release()`` (or a ``with`` block)."""

    def __init__(self, run_dir: str | Path, log=print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.log = log
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLockError naming the holder (or the reason the directory is unwritable)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self._try_lock():
                holder = read_holder(self.path) or {}
                if not self._is_stale(holder) or not self._break_stale(holder):
                    raise RunLockError(self._held_message(holder))
            self._record_holder()
        except OSError as exc:
            self.release()
            raise unwritable(self.run_dir, exc) from None
        return self

    def _try_lock(self) -> bool:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            return False
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                os.close(self._fd)
                self._fd = None
                return False
            raise
        return True

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        """The recorded holder is a dead process on this host (the lock lives on in a descriptor it left to a
        child). A holder on another host cannot be checked from here: never stale."""
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)

    def _break_stale(self, holder: dict) -> bool:
        """Replace the stale lock file by a fresh one and take that; False if another process got it first."""
        os.unlink(self.path)
        self.log(f"[hyperp] broke a stale lock on {self.run_dir}: its holder, pid {holder.get('pid')} on "
                 f"{holder.get('host')}, is no longer running")
        return self._try_lock()

    def _held_message(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
               if holder else "another process")
        return (f"run directory {self.run_dir} is in use by {who}: one trainer per run directory; wait for it, "
                f"choose another logging.run_dir, or remove {self.path} if that process is gone")

    def _record_holder(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no holder recorded once released
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
