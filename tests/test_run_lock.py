"""One trainer per run directory (``run_lock``): a second holder is refused with one line naming the first, a
stale lock (its recorded holder is dead on this host) is broken, an unwritable run directory is one line."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from hyperp_megatron.run_lock import LOCK_FILE, RunLock, RunLockError, read_holder

pytestmark = pytest.mark.tier("unit")

HOLD = textwrap.dedent("""
    import fcntl, json, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, (json.dumps({"host": sys.argv[2], "pid": int(sys.argv[3]) or os.getpid(),
                               "started": "then"}) + "\\n").encode(), 0)
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold(path, host=None, pid=0) -> subprocess.Popen:
    """Another process holding the lock; it records ``host`` / ``pid`` as the holder (default: itself)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), host or socket.gethostname(), str(pid)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
    holder = _hold(tmp_path / LOCK_FILE)
    try:
        with pytest.raises(RunLockError) as error:
            RunLock(tmp_path).acquire()
        message = str(error.value)
        assert "\n" not in message
        assert f"run directory {tmp_path} is in use by pid {holder.pid} on host {socket.gethostname()}" in message
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the holder's death released it
        assert read_holder(tmp_path / LOCK_FILE)["pid"] == os.getpid()
    assert read_holder(tmp_path / LOCK_FILE) is None  # released: no holder recorded


def test_lock_records_its_holder_and_is_exclusive_within_a_process(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["started"]
        with pytest.raises(RunLockError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # flock: a second open file description conflicts too


def test_stale_lock_of_a_dead_holder_on_this_host_is_broken(tmp_path):
    """The recorded holder died; its lock lives on in a process that inherited the descriptor."""
    orphan = _hold(tmp_path / LOCK_FILE, pid=_dead_pid())
    messages = []
    try:
        with RunLock(tmp_path, log=messages.append):
            assert read_holder(tmp_path / LOCK_FILE)["pid"] == os.getpid()
        assert len(messages) == 1 and "broke a stale lock" in messages[0]
    finally:
        orphan.kill()
        orphan.wait()


def test_dead_pid_on_another_host_is_not_stale(tmp_path):
    holder = _hold(tmp_path / LOCK_FILE, host="some-other-node", pid=_dead_pid())
    try:
        with pytest.raises(RunLockError, match="on host some-other-node"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_run_directory_is_one_line(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RunLockError) as error:
        RunLock(tmp_path / "run").acquire()
    assert str(error.value) == (f"cannot write to the run directory {tmp_path / 'run'} ({os.strerror(code)}): "
                                "choose a writable logging.run_dir")
