"""One writer per run folder: `WorkdirLock`, and what a reader is told about a lock it finds.

`WorkdirLock` is an exclusive lock for the whole life of a training (or of a reproduce / ablate
output folder): `<workdir>/.lock`, created with `O_CREAT | O_EXCL` — atomic on local disks and on
NFS v3+/Lustre/GPFS, where `fcntl` locks are not reliable — holding the holder's host, pid,
process start time and a token. The holder refreshes its modification time every
`HEARTBEAT_S`. A lock is stale, and is broken with a warning, when its process is gone (same
host: the pid is not running, or runs another program since the lock was taken) or its heartbeat
is older than `STALE_AFTER_S` (another host: a killed job or a lost node). A second writer
otherwise stops at once with one line naming the holder. Readers never take it; `lock_state`
tells them whether a training holds the folder now or left its lock behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from petsr_jax.io.files import process_running
from petsr_jax.run.layout import LOCK, WorkdirError

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _holder_description(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {started}"


def stale_reason(holder: dict, lock_mtime: float, now: float | None = None) -> str | None:
    """Why a lock's holder is gone, or None while it may be alive."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if not process_running(pid):
            return f"its process {pid} is not running"
        start = _process_start(pid)
        if start is not None and holder.get("process_start") not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None
    if now - lock_mtime > STALE_AFTER_S:
        return f"no heartbeat for {(now - lock_mtime) / 60:.0f} min (host {holder.get('host')})"
    return None


def _read_holder(path: Path) -> tuple[dict, float] | None:
    """(holder record, modification time) of a lock file, or None when there is none.

    A record being written right now, or damaged, reads as `{}` and is judged by its age.
    """
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return json.loads(path.read_text() or "{}"), mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}, mtime


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist, deepest first."""
    missing = []
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


class WorkdirLock:
    """The exclusive writer lock of a folder; a context manager. See the module docstring."""

    def __init__(self, folder, *, what: str = "training"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.what = what
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The folders that do not exist yet, deepest first: a writer refused before it wrote
        # anything removes those it (or whoever prepared the folder since) created.
        self._created = _missing_folders(self.folder)

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": time.time(),
            "what": self.what,
            "command": sys.argv,
            "token": self.token,
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _break(self, holder: dict, reason: str) -> None:
        """Move a stale lock aside; put it back if another process replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text() or "{}")
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != holder.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a fresh lock taken in between: give it back
        else:
            log.warning(
                "%s: broke the stale lock of %s: %s",
                self.folder,
                _holder_description(holder),
                reason,
            )
        aside.unlink(missing_ok=True)

    def acquire(self) -> WorkdirLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            found = _read_holder(self.path)
            if found is None:
                continue  # released between our attempt and the read
            holder, mtime = found
            reason = (
                stale_reason(holder, mtime)
                if holder
                else ("its record is empty" if time.time() - mtime > HEARTBEAT_S else None)
            )
            if reason is None:
                what = holder.get("what", "a process")
                raise WorkdirError(
                    f"{self.folder} is being written by another {what} "
                    f"({_holder_description(holder)}); wait for it, or give another --workdir. "
                    f"If that process is gone, delete {self.path}."
                )
            self._break(holder, reason)
        raise WorkdirError(f"{self.path}: could not take the lock; another process keeps taking it")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        found = _read_holder(self.path)
        if found is not None and found[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for folder in self._created:
            try:
                folder.rmdir()  # a writer that wrote nothing leaves no empty folder
            except OSError:
                break  # not empty: the run wrote something, and its parents hold it

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_state(workdir) -> str | None:
    """`a training holds the lock now (pid ... on ... since ...)`, `its training stopped (its
    process ... is not running)` for a lock left behind, or None without a lock."""
    found = _read_holder(Path(workdir) / LOCK)
    if found is None:
        return None
    holder, mtime = found
    if not holder:
        return "a training may hold the lock now (its record cannot be read)"
    reason = stale_reason(holder, mtime)
    if reason:
        return f"its training stopped ({reason}; the lock is left over)"
    return f"a training holds the lock now ({_holder_description(holder)})"
