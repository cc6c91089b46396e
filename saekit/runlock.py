"""One process at a time in a run folder: a lock file holding who has it.

The lock is a file created with O_CREAT | O_EXCL, which is atomic on local file systems and on NFS (v3 and
later), unlike fcntl/flock locks, which NFS clients may not honour. It holds JSON naming its holder (pid, host,
start time, command), so a refusal can say who is busy in the folder, and a lock left by a process that died
on this host (kill -9, a crash) is taken over instead of blocking the folder for good.
"""

from __future__ import annotations

import json
import logging
import os
import socket
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


class RunLock:
    """`with RunLock(folder, command, wait_s):` holds the folder's lock for the block.

    A busy folder raises RunFolderBusy (naming the holder) at once, or after waiting up to `wait_s` seconds for
    the holder to finish.
    """

    def __init__(self, folder: Path, command: str, wait_s: float = 0.0):
        self.path = Path(folder) / LOCK_FILE
        self.me = Holder(os.getpid(), socket.gethostname(),
                         datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), command)
        self.wait_s = wait_s
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, waiting up to `wait_s` for a busy folder. The lock file is the first thing written into the
        run folder: a full disk or a read-only folder is a one-line DataError naming hydra.run.dir here."""
        try:
            self._acquire()
        except OSError as exc:
            if not is_disk_error(exc):
                raise
            raise disk_error(exc, "hydra.run.dir", self.path.parent) from exc

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
            time.sleep(_POLL_S)
        self.held = True

    def release(self) -> None:
        """Remove the lock file, only if it is still this process's (a takeover may have replaced it)."""
        if self.held and self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False

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
        # Another host's pid cannot be checked from here: its lock is respected until someone deletes it.
        return holder.host == self.me.host and holder.pid != self.me.pid and not _alive(holder.pid)

    def _damaged(self) -> bool:
        """An unreadable lock file old enough not to be one still being written (a crash between create and write)."""
        try:
            return time.time() - self.path.stat().st_mtime > _HALF_WRITTEN_GRACE_S
        except FileNotFoundError:
            return False

    def _break(self, stale: Optional[Holder]) -> None:
        """Move the stale lock aside atomically, so two processes taking it over cannot delete each other's new lock."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.me.pid}")
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
        folder = self.path.parent
        if holder is None:
            return (f"hydra.run.dir={folder} is locked by another process ({self.path} cannot be read); wait for it, "
                    f"set lock_wait_s=<seconds> to wait, or delete {self.path} if no process uses the folder")
        waited = f" after waiting {self.wait_s:g} s" if self.wait_s > 0 else ""
        return (f"hydra.run.dir={folder} is in use by {holder.describe()}{waited}; wait for it to finish, set "
                f"lock_wait_s=<seconds> to wait, or use another hydra.run.dir")
