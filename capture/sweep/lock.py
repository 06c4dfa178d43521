"""One writer per sweep folder: ``OUT/.sweep.lock`` names the ``diffviz sweep`` that holds it.

    with SweepLock(out) as lock:     # SweepLocked (one line naming the holder) if another sweep holds it
        lock.note                    # "took over the lock of ..." when its holder had died, else None

The file holds the holder's pid, host and start time (JSON, for people and for the refusal line); an exclusive
``flock`` on it is what decides, so a holder killed with SIGKILL frees it at once (the kernel drops the lock) and
a pid reused by another program cannot keep it. Where ``flock`` is not supported, a lock whose holder ran on this
host and whose pid is gone counts as stale. Released by unlinking the file while still holding the lock.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

LOCK_FILE = ".sweep.lock"
#: the most bytes of a lock file read (a hostile one cannot make the refusal slow)
MAX_LOCK_BYTES = 4096


class SweepLocked(RuntimeError):
    """Another sweep holds OUT (or the lock cannot be taken); ``str()`` is one line."""


def _holder_text(info: dict[str, Any]) -> str:
    pid, host, started = info.get("pid"), info.get("host"), info.get("started")
    parts = [f"pid {pid}" if isinstance(pid, int) else "an unknown pid"]
    if isinstance(host, str):
        parts.append(f"on {host[:80]}")
    if isinstance(started, str):
        parts.append(f"since {started[:40]}")
    return " ".join(parts)


def _read_info(fd: int) -> dict[str, Any] | None:
    """The holder's record (None when the file is empty; ``{}`` when it does not parse)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, MAX_LOCK_BYTES)
    if not data.strip():
        return None
    try:
        info = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _alive_here(info: dict[str, Any]) -> bool:
    """Whether the record's process may still run: a pid on another host is assumed alive."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SweepLock:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.fd: int | None = None
        #: a line saying a dead holder's lock was taken over, or None
        self.note: str | None = None

    def acquire(self) -> "SweepLock":
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _attempt in range(20):
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                raise SweepLocked(f"--out: cannot create the lock file {self.path} ({exc.strerror or exc})") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise SweepLocked(f"--out: {self.path} is not a regular file; remove it")
                previous = self._lock(fd)
                if os.fstat(fd).st_ino != os.stat(self.path, follow_symlinks=False).st_ino:
                    raise FileNotFoundError  # released (unlinked) between our open and our lock: try again
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            if previous is not None:
                self.note = f"took over the lock of a sweep that is gone ({_holder_text(previous)})"
            self._write_own()
            return self
        raise SweepLocked(f"--out: could not take the lock {self.path}: it keeps changing")

    def _lock(self, fd: int) -> dict[str, Any] | None:
        """Lock ``fd``; the record a dead holder left (None if none). Raises SweepLocked while a holder lives."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd) or {}
            raise SweepLocked(f"--out: {self.out} is being written by another diffviz sweep ({_holder_text(info)}); "
                              "wait for it to finish, or stop it") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise SweepLocked(f"--out: cannot lock {self.path} ({exc.strerror or exc})") from None
            info = _read_info(fd)  # no flock here: judge the record alone
            if info is not None and _alive_here(info):
                raise SweepLocked(f"--out: {self.out} is being written by another diffviz sweep "
                                  f"({_holder_text(info)}); if it is gone, delete {self.path}") from None
            return info
        return _read_info(fd)

    def _write_own(self) -> None:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, record.encode(), 0)
            os.fsync(self.fd)
        except OSError:
            pass  # a full disk: the flock, not the record, is the lock

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a waiter that opened the old file sees it is gone
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
