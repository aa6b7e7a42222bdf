"""What a run records about itself (run.json), and what a reader is told about how far it got.

`write_run_record` writes run.json when a training starts: how many steps it will run, and the
command, versions, commit and devices behind it. Readers that never take the lock
(`petsr_jax.load`, `launch/enhance.py`) ask `progress` whether the run finished ("trained 4 of 6
steps"), and `never_checkpointed` what to say about a run with no checkpoint yet: still before
its first one, or stopped there, with the recorded command that starts it again.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from petsr_jax.io.files import write_json_atomic
from petsr_jax.run import layout
from petsr_jax.run.lock import lock_state


def _git_commit() -> str | None:
    """The commit of the checkout petsr_jax runs from, with "+dirty" for local changes."""
    repo = Path(__file__).resolve().parents[2]
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
    write_json_atomic(Path(workdir) / layout.RUN_RECORD, record)
    return record


def _run_record(workdir) -> dict:
    """run.json, or `{}` when it is absent or cannot be read (a reader's hint, not a refusal)."""
    with contextlib.suppress(layout.WorkdirError):
        return layout.read_record(workdir, layout.RUN_RECORD) or {}
    return {}


def progress(workdir) -> str | None:
    """None for a finished run (results written); else what a reader should be told."""
    workdir = Path(workdir)
    if (workdir / layout.RESULTS).exists():
        return None
    total = _run_record(workdir).get("total_steps")
    step = layout.latest_step(workdir) or 0
    of = f" of {total}" if total else ""
    state = lock_state(workdir)
    being = f" ({state})" if state else ""
    return f"{workdir} is unfinished: trained {step}{of} steps{being}"


def recorded_command(workdir) -> str | None:
    """The command line that started the workdir's training (run.json), as a shell takes it."""
    argv = _run_record(workdir).get("command")
    if not argv or not isinstance(argv, list):
        return None
    argv = [str(a) for a in argv]
    return shlex.join((["python"] if argv[0].endswith(".py") else []) + argv)


def never_checkpointed(workdir) -> str:
    """What to tell a reader of a workdir that has a config.json but no checkpoint: whether
    its training is still before its first checkpoint or stopped there, and what starts it."""
    workdir = Path(workdir)
    first = None
    with contextlib.suppress(layout.WorkdirError, KeyError, AttributeError, TypeError, ValueError):
        config = layout.read_config(workdir) or {}
        run = _run_record(workdir)
        every = config.get("train", {}).get("checkpoint_every_steps") or run["steps_per_epoch"]
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
