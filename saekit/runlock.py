"""One process at a time: lock files holding who has them (run folders, activation-cache builds).

A lock is a file created with O_CREAT | O_EXCL, which is atomic on local file systems and on NFS (v3 and
later), unlike fcntl/flock locks, which NFS clients may not honour. It holds JSON naming its holder (pid, host,
start time, command), so a refusal can say who is busy, and a lock left by a process that died on this host
(kill -9, a crash) is taken over instead of blocking for good. A holder on another host cannot be asked whether
it lives; with a heartbeat (`heartbeat_s`) it touches the file while it works, and a lock whose heartbeat has
been silent for `stale_after_s` is taken over (a node that died mid-build on a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from saekit.errors import ConfigError
from saekit.fileutil import disk_error, is_disk_error

log = logging.getLogger(__name__)

LOCK_FILE = ".saekit.lock"
_POLL_S = 0.2
_HALF_WRITTEN_GRACE_S = 10.0
"""A lock file that cannot be read yet may be in the middle of being written; after this long it is damaged."""


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class FileLock:
    """`with FileLock(path, command, wait_s):` holds the lock file `path` for the block.

    Busy: raises RunFolderBusy (naming the holder) at once, or after waiting up to `wait_s` seconds (may be
    infinite) for the holder to finish. `heartbeat_s`: while held, the file's mtime is refreshed this often, and a
    lock of another host whose mtime is older than `stale_after_s` is taken over.
    """

    def __init__(self, path: Path, command: str, wait_s: float = 0.0, heartbeat_s: Optional[float] = None,
                 stale_after_s: Optional[float] = None, setting: str = "hydra.run.dir"):
        self.path = Path(path)
        self.setting = setting
        """The setting that names the lock's folder (a full or read-only disk is one line naming it)."""
        self.me = Holder(os.getpid(), socket.gethostname(),
                         datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), command)
        self.wait_s = wait_s
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.held = False
        self._beating: Optional[threading.Event] = None
        self._waiting_said = False

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, waiting up to `wait_s` for a busy folder. The lock file is the first thing written into the
        folder: a full disk or a read-only folder is a one-line DataError naming the setting (hydra.run.dir)."""
        try:
            self._acquire()
        except OSError as exc:
            if not is_disk_error(exc):
                raise
            raise disk_error(exc, self.setting, self.path.parent) from exc

    def _acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self._try_create():
            holder = self._holder()
            if holder is not None and self._is_stale(holder):
                log.warning("%s: taking over the lock of a process that is gone (%s)", self.path.parent,
                            holder.describe())
                self._break(holder)
                continue
            if holder is None and self._damaged():
                log.warning("%s: taking over a damaged lock file (%s)", self.path.parent, self.path)
                self._break(None)
                continue
            if time.monotonic() >= deadline:
                raise RunFolderBusy(self._busy_message(holder))
            self._say_waiting(holder)
            time.sleep(_POLL_S)
        self.held = True
        self._start_heartbeat()

    def release(self) -> None:
        """Remove the lock file, only if it is still this process's (a takeover may have replaced it)."""
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        if self.held and self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _say_waiting(self, holder: Optional[Holder]) -> None:
        if not self._waiting_said and holder is not None and self.wait_s > 0:
            log.info("waiting for %s (%s)", holder.describe(), self.path)
            self._waiting_said = True

    def _start_heartbeat(self) -> None:
        if not self.heartbeat_s:
            return
        stop = self._beating = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:  # gone (taken over) or unreachable for a moment: the next beat tries again
                    pass

        threading.Thread(target=beat, name=f"saekit-lock-heartbeat:{self.path.name}", daemon=True).start()

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(asdict(self.me)))
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:  # a full disk: no empty lock file left to block the folder
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _holder(self) -> Optional[Holder]:
        """Who holds the lock; None when the file is gone or cannot be read (yet)."""
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _is_stale(self, holder: Holder) -> bool:
        if holder.host == self.me.host:
            return holder.pid != self.me.pid and not _alive(holder.pid)
        # Another host's pid cannot be checked from here: with a heartbeat, its silence says it is gone;
        # without one, its lock is respected until someone deletes it.
        if self.stale_after_s is None:
            return False
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_after_s
        except FileNotFoundError:
            return False

    def _damaged(self) -> bool:
        """An unreadable lock file old enough not to be one still being written (a crash between create and write)."""
        try:
            return time.time() - self.path.stat().st_mtime > _HALF_WRITTEN_GRACE_S
        except FileNotFoundError:
            return False

    def _break(self, stale: Optional[Holder]) -> None:
        """Move the stale lock aside atomically, so two processes taking it over cannot delete each other's new lock."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.me.pid}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process moved it first
            return
        try:
            moved = Holder(**json.loads(aside.read_text()))
        except (OSError, ValueError, TypeError):
            moved = None
        if moved != stale:  # a live lock created after we read the stale one: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _busy_message(self, holder: Optional[Holder]) -> str:
        waited = f" after waiting {self.wait_s:g} s" if self.wait_s > 0 else ""
        who = holder.describe() if holder is not None else f"another process ({self.path} cannot be read)"
        return f"{self.path} is held by {who}{waited}; delete it if no process uses it"


class RunLock(FileLock):
    """`with RunLock(folder, command, wait_s):` holds a run folder's lock (`.saekit.lock`) for the block."""

    def __init__(self, folder: Path, command: str, wait_s: float = 0.0):
        super().__init__(Path(folder) / LOCK_FILE, command, wait_s)

    def _busy_message(self, holder: Optional[Holder]) -> str:
        folder = self.path.parent
        if holder is None:
            return (f"hydra.run.dir={folder} is locked by another process ({self.path} cannot be read); wait for it, "
                    f"set lock_wait_s=<seconds> to wait, or delete {self.path} if no process uses the folder")
        waited = f" after waiting {self.wait_s:g} s" if self.wait_s > 0 else ""
        return (f"hydra.run.dir={folder} is in use by {holder.describe()}{waited}; wait for it to finish, set "
                f"lock_wait_s=<seconds> to wait, or use another hydra.run.dir")
