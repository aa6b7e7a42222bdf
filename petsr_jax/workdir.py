"""A run's folder: which run it holds, who is writing it, and how far it got.

**One run identity.** A workdir holds the run its `config.json` records. Every field of a config
defines the run (what is learned, on what data, for how long, how it is scored) except
`RUNTIME_FIELDS` — how and where it computes: loader workers, logging cadence, convolution
kernels, recomputation, the distributed launch — and `EVALUATION_FIELDS`, which change what a
finished run is scored with but not its parameters (a rerun that changes only those scores the
trained parameters again). `check_same_run` refuses a workdir that holds another run, naming each
differing field with its two values, before anything is written; `main`, `reproduce` and
`ablate` all go through it (via `train.train_and_evaluate` or directly). It also refuses a
config.json edited after training (`checkpoint.check_config_unedited`: each checkpoint records
the config it was trained with), and `check_not_data` refuses a folder of scans or of anything
else that is not a run. `default_workdir` gives a readable name, plus a short hash of the
defining fields when that name is taken by another run.

**One writer.** `WorkdirLock` is an exclusive lock for the whole life of a training (or of a
reproduce / ablate output folder): `<workdir>/.lock`, created with `O_CREAT | O_EXCL` — atomic on
local disks and on NFS v3+/Lustre/GPFS, where `fcntl` locks are not reliable — holding the
holder's host, pid, process start time and a token. The holder refreshes its modification time
every `HEARTBEAT_S`. A lock is stale, and is broken with a warning, when its process is gone
(same host: the pid is not running, or runs another program since the lock was taken) or its
heartbeat is older than `STALE_AFTER_S` (another host: a killed job or a lost node). A second
writer otherwise stops at once with one line naming the holder. Readers never take it.

**Progress.** `run.json` records, when a training starts, how many steps it will run and the
command, versions, commit and devices behind it; `progress(workdir)` tells a reader whether the
run finished ("trained 4 of 6 steps").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from petsr_jax.config import MODELS, base_config, flatten
from petsr_jax.files import write_json_atomic

log = logging.getLogger(__name__)

RUNTIME_FIELDS = (
    "data.num_workers",
    "distributed.",
    "model.conv",
    "model.remat",
    "train.log_every_steps",
    "train.keep_checkpoints",
)
EVALUATION_FIELDS = ("eval.",)

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0


class WorkdirError(ValueError):
    """A workdir that holds another run, or that another process is writing."""


# --------------------------------------------------------------------------------------------
# Run identity
# --------------------------------------------------------------------------------------------


def _comparable(config_or_record) -> dict:
    """Flat `field -> value` of a config or of a recorded config.json; splits as counts."""
    tree = config_or_record if isinstance(config_or_record, dict) else config_or_record.to_dict()
    flat = flatten(json.loads(json.dumps(tree)))
    split = flat.get("data.split")
    if isinstance(split, str):
        parts = split.replace(",", "/").split("/")
        if all(p.strip().isdigit() for p in parts):
            flat["data.split"] = [int(p) for p in parts]
    return flat


def _with_added_defaults(recorded: dict) -> dict:
    """A recorded config.json with the fields it lacks filled from `base_config`'s defaults."""
    model = (recorded.get("model") or {}).get("name")
    if model not in MODELS:
        return recorded
    filled = json.loads(base_config(model).to_json())

    def overlay(into: dict, saved: dict) -> None:
        for key, value in saved.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                overlay(into[key], value)
            else:
                into[key] = value

    overlay(filled, recorded)
    return filled


def differences(recorded: dict, config, ignore: tuple[str, ...] = RUNTIME_FIELDS) -> list[str]:
    """`field: <recorded> in the workdir, <now> now` for each field where a recorded config
    (config.json) and `config` differ, leaving out fields starting with `ignore`. A field one
    side lacks shows as `<absent>`, except a field added to the project after the workdir was
    written: that run had the field's default behaviour (`config.base_config`), which is what it
    is compared with, so an older run is not taken for another config."""
    before, now = _comparable(_with_added_defaults(recorded)), _comparable(config)
    rows = []
    for key in sorted(set(before) | set(now)):
        if key.startswith(tuple(ignore)) or before.get(key) == now.get(key):
            continue
        rows.append(
            f"{key}: {before.get(key, '<absent>')!r} in the workdir, "
            f"{now.get(key, '<absent>')!r} now"
        )
    return rows


def defining_differences(recorded: dict, config) -> list[str]:
    """`differences` in the fields that change the trained parameters."""
    return differences(recorded, config, RUNTIME_FIELDS + EVALUATION_FIELDS)


def edited_fields(trained: dict, recorded: dict) -> list[str]:
    """`field: <trained> when trained, <recorded> in config.json` for each field that changes
    the trained parameters and differs between the config a checkpoint was trained with and the
    workdir's config.json. Fields only one side holds are left out: a field added to (or
    dropped from) the project between the two writes is not an edit."""
    before, now = _comparable(trained), _comparable(recorded)
    ignore = RUNTIME_FIELDS + EVALUATION_FIELDS
    return [
        f"{key}: {before[key]!r} when trained, {now[key]!r} in config.json"
        for key in sorted(set(before) & set(now))
        if not key.startswith(ignore) and before[key] != now[key]
    ]


def recorded_config(workdir) -> dict | None:
    """The config.json of a workdir, or None when it has none; unreadable is an error."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WorkdirError(
            f"{path} cannot be read ({error}); it records which run {Path(workdir).name} "
            "holds. Restore it, or give another --workdir."
        ) from None


def holds_run(workdir) -> bool:
    """True when a workdir holds trained state: checkpoints, best params or results."""
    workdir = Path(workdir)
    folders = (workdir / "checkpoints", workdir / "best")
    has_state = any(f.is_dir() and any(f.iterdir()) for f in folders)
    return has_state or (workdir / "results.json").exists()


def check_same_run(
    workdir, config, *, remedy: str = "Give another --workdir for this config"
) -> None:
    """Refuse a workdir that holds a run of another config, before anything is written.

    Raises `WorkdirError` naming every differing field that changes the trained parameters,
    with both values, and `remedy` (what the caller's user changes to pick another folder:
    `--workdir` for main, `--runs` for reproduce and ablate). A config.json edited after
    training is refused first, by its own name: it no longer says which run the workdir holds.
    A workdir without trained state (a run killed before its first checkpoint) holds nothing
    to protect and is accepted.
    """
    from petsr_jax import checkpoint  # below this module: it reads what the steps recorded

    recorded = recorded_config(workdir)
    if recorded is None or not holds_run(workdir):
        return
    try:
        checkpoint.check_config_unedited(workdir, recorded)
    except checkpoint.CheckpointError as error:
        raise WorkdirError(str(error)) from None
    rows = defining_differences(recorded, config)
    if recorded.get("model", {}).get("name") != config.model.name:
        # Another network altogether: its depth and width would only add noise.
        rows = [r for r in rows if not r.startswith(("model.num_blocks", "model.width"))]
    if rows:
        raise WorkdirError(
            f"{workdir} holds a run of another config ({'; '.join(rows)}). {remedy}, or rerun "
            "with the config the workdir records."
        )


# What a run leaves in its workdir (README, "What a run writes"), and its other own files.
RUN_ENTRIES = frozenset(
    {
        "config.json",
        "split.json",
        "data_info.json",
        RUN_FILE,
        "metrics.jsonl",
        "tensorboard",
        "checkpoints",
        "best",
        "results.json",
        "results.md",
        "test_scores.json",
        "test_slices.png",
        "training_curves.png",
        "train_time.json",
        "val_results.json",
    }
)
# File names of scans: DICOM (also recognised by its "DICM" marker), NIfTI, Analyze, MINC, MGH.
SCAN_SUFFIXES = (".dcm", ".ima", ".nii", ".nii.gz", ".img", ".hdr", ".mnc", ".mgz", ".nrrd")
# How many files of a subfolder are looked at to tell a DICOM series folder.
_FILES_LOOKED_AT = 20
_MAX_NAMED = 5


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_scan(entry: Path) -> bool:
    """A scan file, or a folder holding scan files directly (a DICOM series)."""
    if entry.is_file():
        return entry.name.lower().endswith(SCAN_SUFFIXES) or _is_dicom_file(entry)
    if entry.is_dir():
        try:
            files = [p for _, p in zip(range(_FILES_LOOKED_AT), entry.iterdir(), strict=False)]
        except OSError:
            return False
        return any(p.is_file() and _is_scan(p) for p in files)
    return False


def check_not_data(workdir) -> None:
    """Refuse, before anything is written, a workdir that holds scans, or that holds things
    that are not a run's and no config.json: a run's checkpoints, logs and results would be
    written among someone's data (`--workdir` given a DICOM folder by mistake).

    A folder that does not exist yet, an empty one, and a run's own workdir are accepted.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        return
    entries = sorted(e for e in workdir.iterdir() if not e.name.startswith("."))
    scans = [e for e in entries if e.name not in RUN_ENTRIES and _is_scan(e)]
    if scans:
        raise WorkdirError(
            f"workdir {workdir} holds scans ({_named(scans)}); a run writes checkpoints, logs "
            "and results into its workdir and must not mix them with data: give --workdir a "
            "new or empty folder (e.g. runs/<name>)"
        )
    if (workdir / "config.json").is_file():
        return
    foreign = [e for e in entries if e.name not in RUN_ENTRIES]
    if foreign:
        raise WorkdirError(
            f"workdir {workdir} is not a petsr_jax run (it has no config.json) and holds other "
            f"things ({_named(foreign)}); give --workdir a new or empty folder (e.g. "
            "runs/<name>)"
        )


def _named(entries: list[Path]) -> str:
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:_MAX_NAMED]]
    more = len(entries) - _MAX_NAMED
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def fingerprint(config) -> str:
    """A short hash of the fields that define a run."""
    flat = {
        k: v
        for k, v in _comparable(config).items()
        if not k.startswith(RUNTIME_FIELDS + EVALUATION_FIELDS)
    }
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]


def readable_name(config) -> str:
    """`<model>_x<scale>` (`<model>_scanner` for a scanner task), plus the cohort preset, depth
    and domain where not the paper's, `_c<k>` for k neighbouring slices each side, `_kept` for a
    bicubic task that keeps activity, and `_mr` for MR guidance."""
    task = config.get("task", {})
    scanner = task.get("degradation", "bicubic") == "scanner"
    name = f"{config.model.name}_scanner" if scanner else f"{config.model.name}_x{config.scale}"
    on_phantoms = scanner and config.scanner.data == "phantoms"
    if not config.data.root and not on_phantoms and config.data.cohort != "paper":
        name += f"_{config.data.cohort}"
    if config.model.name == "deepsr" and config.model.num_blocks != 20:
        name += f"_b{config.model.num_blocks}"
    if config.data.domain != "physical":
        name += f"_{config.data.domain}"
    if task.get("context", 0):
        name += f"_c{task.context}"
    if not scanner and task.get("consistency", "none") != "none":
        name += "_kept"
    if config.get("mr") is not None and config.mr.t1:  # MR-guided beside its PET-only twin
        name += "_mr_coords" if config.mr.coordinates else "_mr"
    return name


def default_workdir(config, runs_dir="runs") -> Path:
    """`runs/<readable name>`, or `runs/<readable name>-<fingerprint>` when the readable folder
    holds a run of another config — so differing configs never share a default workdir, and
    the first run of a name keeps the name a person would type."""
    readable = Path(runs_dir) / readable_name(config)
    recorded = recorded_config(readable) if readable.is_dir() else None
    if recorded is None or not holds_run(readable) or not defining_differences(recorded, config):
        return readable
    return readable.with_name(f"{readable.name}-{fingerprint(config)}")


# --------------------------------------------------------------------------------------------
# One writer
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_description(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {started}"


def stale_reason(holder: dict, lock_mtime: float, now: float | None = None) -> str | None:
    """Why a lock's holder is gone, or None while it may be alive."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if not _pid_running(pid):
            return f"its process {pid} is not running"
        start = _process_start(pid)
        if start is not None and holder.get("process_start") not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None
    if now - lock_mtime > STALE_AFTER_S:
        return f"no heartbeat for {(now - lock_mtime) / 60:.0f} min (host {holder.get('host')})"
    return None


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
        self.path = self.folder / LOCK_FILE
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

    def _read_holder(self) -> tuple[dict, float] | None:
        try:
            mtime = self.path.stat().st_mtime
            return json.loads(self.path.read_text() or "{}"), mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}, mtime  # being written right now, or damaged: judged by its age

    def _break(self, holder: dict, reason: str) -> None:
        """Move a stale lock aside; put it back if another process replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
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
            found = self._read_holder()
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
        found = self._read_holder()
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


# --------------------------------------------------------------------------------------------
# What a run records about itself, and how far it got
# --------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    """The commit of the checkout petsr_jax runs from, with "+dirty" for local changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("petsr_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def write_run_record(workdir, *, total_steps: int, steps_per_epoch: int) -> dict:
    """run.json: how long the run is, and the command, versions, commit and devices behind it."""
    import jax

    devices = jax.devices()
    record = {
        "total_steps": int(total_steps),
        "steps_per_epoch": int(steps_per_epoch),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "versions": _versions(),
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "devices": {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "processes": jax.process_count(),
        },
    }
    write_json_atomic(Path(workdir) / RUN_FILE, record)
    return record


def latest_step(workdir) -> int | None:
    """The newest checkpointed step of a workdir (by folder name), or None."""
    folder = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps) if steps else None


def progress(workdir) -> str | None:
    """None for a finished run (results written); else what a reader should be told."""
    workdir = Path(workdir)
    if (workdir / "results.json").exists():
        return None
    total = None
    with contextlib.suppress(OSError, ValueError):
        total = json.loads((workdir / RUN_FILE).read_text()).get("total_steps")
    step = latest_step(workdir) or 0
    of = f" of {total}" if total else ""
    state = lock_state(workdir)
    being = f" ({state})" if state else ""
    return f"{workdir} is unfinished: trained {step}{of} steps{being}"


# --------------------------------------------------------------------------------------------
# What a reader is told about a run that is not there yet
# --------------------------------------------------------------------------------------------


def recorded_command(workdir) -> str | None:
    """The command line that started the workdir's training (run.json), as a shell takes it."""
    import shlex

    try:
        argv = json.loads((Path(workdir) / RUN_FILE).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None
    if not argv or not isinstance(argv, list):
        return None
    argv = [str(a) for a in argv]
    return shlex.join((["python"] if argv[0].endswith(".py") else []) + argv)


def lock_state(workdir) -> str | None:
    """`a training holds the lock now (pid ... on ... since ...)`, `its training stopped (its
    process ... is not running)` for a lock left behind, or None without a lock."""
    path = Path(workdir) / LOCK_FILE
    try:
        mtime = path.stat().st_mtime
        holder = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "a training may hold the lock now (its record cannot be read)"
    reason = stale_reason(holder, mtime) if holder else None
    if reason:
        return f"its training stopped ({reason}; the lock is left over)"
    return f"a training holds the lock now ({_holder_description(holder)})"


def never_checkpointed(workdir) -> str:
    """What to tell a reader of a workdir that has a config.json but no checkpoint: whether
    its training is still before its first checkpoint or stopped there, and what starts it."""
    workdir = Path(workdir)
    first = None
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        record = recorded_config(workdir) or {}
        run = json.loads((workdir / RUN_FILE).read_text())
        every = record.get("train", {}).get("checkpoint_every_steps") or run["steps_per_epoch"]
        first = f"the first comes at step {int(every)} of {int(run['total_steps'])}"
    when = f" ({first})" if first else ""
    state = lock_state(workdir)
    if state and state.startswith("a training holds"):
        return (
            f"{workdir} holds a training that has not reached its first checkpoint yet{when}; "
            f"{state}. Load it again once it has saved one."
        )
    command = recorded_command(workdir)
    rerun = (
        f"rerunning its training command starts it: {command}"
        if command
        else "rerunning the launch/main.py command that started it (same --config and "
        "--workdir) starts it"
    )
    stopped = f"; {state}" if state else ""
    return (
        f"{workdir} holds a training run that never reached a checkpoint{when}{stopped}, so "
        f"there are no trained params to load; {rerun}"
    )
