"""Every file the project writes is whole or absent: written under a temporary name, then renamed.

Small files — a run's records and results, JSON, markdown, figures — go through `write_atomic`
(`write_json_atomic`, `save_figure_atomic`): one temporary sibling, flushed, then one rename,
which is atomic on POSIX file systems. An interruption (Ctrl-C, a killed job, a full disk) never
leaves a half-written file, and a reader never sees one.

Scan outputs (a DICOM series folder, a NIfTI file) are first written completely under a
temporary name beside their target (`staging`), then renamed; several outputs of one scan are
renamed together by `commit`, which renames all of them or, on failure, none. They are never
written over the input, nor over an earlier result.

Every temporary name is recognisable and names its writer,

    .<target name>.<host>-<pid>-<random>.tmp           (a file, or a DICOM series folder)
    .<target stem>.<host>-<pid>-<random>.tmp.nii.gz    (a NIfTI file)

so a process killed mid-write (kill -9, a lost node) leaves something the next run can handle:
readers skip these names, and the next writer into the same folder removes those whose process
is gone (same host, pid no longer running: `process_running`, the one liveness check, which the
workdir lock uses too). Leftovers of another host, or of a process still running, are left
alone; the reader names them in its warning.

Every failure to write a scan output (permissions, a full disk, a file system that refuses a
rename) becomes one `ScanError` naming the target and the cause, and clean-up after a failure
never raises an error of its own over the first one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from petsr_jax.io.errors import ScanError
from petsr_jax.volume import Volume

# Any temporary name of these writers, this version's or an earlier one's (`.<name>.<hex>.tmp`).
_TEMPORARY = re.compile(r"^\..+\.tmp(\.nii(\.gz)?)?$")
# This version's names, which say which process wrote them.
_OWNED_TEMPORARY = re.compile(
    r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.nii(\.gz)?)?$"
)


@dataclasses.dataclass(frozen=True)
class Staged:
    """A complete output under its temporary name, waiting for `commit` to give it its name.

    `replace`: the target may be an existing file that the rename replaces (an explicit
    `overwrite=True`); otherwise an existing target is refused.
    """

    temporary: Path
    target: Path
    replace: bool = False


def refuse_source(target: Path, volume: Volume) -> None:
    """Refuse a target equal to, or inside, the file or folder the volume was read from."""
    source = volume.meta.get("source_path")
    if source is None:
        return
    source = Path(source).resolve()
    target = target.resolve()
    if target == source or (source.is_dir() and source in target.parents):
        raise ScanError(f"{target}: refusing to write into the input {source}")


def _this_host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def temporary_name(target: Path, suffix: str = "") -> Path:
    """A hidden sibling of `target` that names this process; `suffix` is kept at the end."""
    stem = target.name[: len(target.name) - len(suffix)]
    owner = f"{_this_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return target.with_name(f".{stem}.{owner}.tmp{suffix}")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is a temporary name of these writers."""
    return bool(_TEMPORARY.match(name))


def process_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _process_is_gone(match: re.Match) -> bool:
    if match["host"] != _this_host():
        return False  # another machine's process: its state cannot be known from here
    pid = int(match["pid"])
    return pid != os.getpid() and not process_running(pid)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` left by processes that no longer run; return them."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _OWNED_TEMPORARY.match(entry.name)
        if match and _process_is_gone(match):
            remove_quietly(entry)
            removed.append(entry)
    if removed:
        warnings.warn(
            f"{folder}: removed {len(removed)} leftover(s) of an interrupted write: "
            + ", ".join(p.name for p in removed),
            stacklevel=3,
        )
    return removed


def remove_quietly(path: Path) -> None:
    """Remove a temporary file or folder, best effort.

    Runs while an error is already on its way to the user; a failure here (a read-only folder, a
    vanished file) must not replace that error with one about the clean-up.
    """
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def withdraw(outputs: Sequence[Path]) -> list[Path]:
    """Remove outputs this process has just written, best effort; return those still there.

    For an output whose record (e.g. `activity_changes.json`) cannot be written: an output
    without its record is removed, so the two stay in step, unless the folder refuses that too
    (then the caller names what is left).
    """
    for path in outputs:
        remove_quietly(Path(path))
    return [Path(p) for p in outputs if Path(p).exists() or Path(p).is_symlink()]


def write_failed(target: Path, what: str, error: Exception) -> ScanError:
    """The one-line error for an output that could not be written."""
    cause = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return ScanError(f"{target}: cannot write the {what} ({cause}); nothing written")


@contextlib.contextmanager
def staging(target: Path, temporary: Path, what: str) -> Iterator[None]:
    """Write under `temporary`: on any failure remove it, and report OS errors as `ScanError`."""
    try:
        yield
    except OSError as error:
        remove_quietly(temporary)
        raise write_failed(target, what, error) from error
    except BaseException:
        remove_quietly(temporary)
        raise


def refuse_existing_target(target: Path, hint: str = "") -> None:
    """Refuse an existing file, or an existing folder with something in it."""
    if target.is_dir() and not target.is_symlink():
        if any(target.iterdir()):
            raise ScanError(f"{target}: already exists and is not an empty folder; nothing written")
    elif target.exists() or target.is_symlink():
        raise ScanError(f"{target}: already exists; nothing written{hint}")


def commit(staged: Sequence[Staged]) -> None:
    """Rename every staged output to its target, or none of them.

    When a rename fails, the outputs already renamed are moved back and every temporary is
    removed, so the targets are as they were before the write (except a file an explicit
    `overwrite=True` already replaced). Between two renames a kill -9 can still leave the first
    output alone; the window is two system calls wide.
    """
    renamed: list[Staged] = []
    try:
        for item in staged:
            if not item.replace:
                refuse_existing_target(item.target)
            try:
                os.replace(item.temporary, item.target)
            except OSError as error:
                what = "series" if item.temporary.is_dir() else "file"
                raise write_failed(item.target, what, error) from error
            renamed.append(item)
    except BaseException:
        for item in reversed(renamed):
            with contextlib.suppress(OSError):
                os.rename(item.target, item.temporary)
        raise
    finally:
        for item in staged:
            remove_quietly(item.temporary)


def write_atomic(path: Path, payload: bytes) -> Path:
    """Write `payload` to `path` through a temporary sibling and a rename; return `path`.

    The file gets the permissions a plain `open` would give it (0666 less the umask), so results
    are readable by collaborators. An `OSError` leaves no temporary behind and `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        remove_quietly(temporary)
        raise
    return path


def write_json_atomic(path: Path, obj, *, sort_keys: bool = False) -> Path:
    """`obj` as indented JSON (and a final newline) through `write_atomic`."""
    return write_atomic(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def save_figure_atomic(fig, path: Path, **kwargs) -> Path:
    """`fig.savefig` (format from the suffix, png without one) through `write_atomic`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return write_atomic(path, buffer.getvalue())
