"""A run's workdir: the name of every file it holds, said once, and the one reader of its records.

    <workdir>/config.json         the exact config (compared by `identity`, read by `load`)
              split.json          the patients of each split
              data_info.json      the training data's units, slice size, pixel and voxel spacing
              run.json            the run's length in steps, command line, versions, devices
              .lock               the writer's lock while a training runs (`lock`)
              checkpoints/<step>  Orbax full states; best/<step> the best validation params
              metrics.jsonl, tensorboard/, train_time.json   what the training loop logs
              results.json, results.md, test_scores.json, test_slices.png, training_curves.png
                                  what a finished run leaves (`RUN_OUTPUTS`)
              val_results.json    the ablation's validation scores of the params a run scored

Every module that opens one of these files takes its name from here, so renaming a file, or
asking what a workdir may hold (`ENTRIES`, which `identity.check_not_data` trusts), is one
edit. The records (config.json, data_info.json, results.json, ...) are read by `read_record`
alone: absent is None, anything that is not a JSON object is one `WorkdirError` naming the file.
Writing goes through `petsr_jax.io.files`, whole or not at all.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

CONFIG = "config.json"
SPLIT = "split.json"
DATA_INFO = "data_info.json"
RUN_RECORD = "run.json"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
BEST = "best"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TRAIN_TIME = "train_time.json"
RESULTS = "results.json"
RESULTS_MD = "results.md"
TEST_SCORES = "test_scores.json"
TEST_FIGURE = "test_slices.png"
CURVES = "training_curves.png"
VAL_RESULTS = "val_results.json"

# What `evaluation.report.write_run_outputs` leaves in a finished workdir.
RUN_OUTPUTS = (RESULTS, RESULTS_MD, TEST_SCORES, TEST_FIGURE, CURVES)
# Everything a run may leave in its workdir (hidden files, the lock among them, aside).
ENTRIES = frozenset(
    {CONFIG, SPLIT, DATA_INFO, RUN_RECORD, CHECKPOINTS, BEST, METRICS, TENSORBOARD, TRAIN_TIME}
    | set(RUN_OUTPUTS)
    | {VAL_RESULTS}
)


class WorkdirError(ValueError):
    """A workdir that holds another run, that another process is writing, that is not a run's,
    or whose records cannot be read; the message names the folder or file and what to do."""


def read_record(workdir, name: str) -> dict | None:
    """The JSON object in `<workdir>/<name>`, or None when there is no such file.

    Raises `WorkdirError` naming the file when it cannot be read or holds no JSON object.
    """
    path = Path(workdir) / name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WorkdirError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(record, dict):
        raise WorkdirError(f"{path}: holds {type(record).__name__}, not a JSON object")
    return record


def read_config(workdir) -> dict | None:
    """The config a workdir records (config.json, as saved), or None when it has none.

    Raises `WorkdirError` when it cannot be read: it says which run the workdir holds.
    """
    try:
        return read_record(workdir, CONFIG)
    except WorkdirError as error:
        raise WorkdirError(
            f"{error}; it records which run {Path(workdir).name} holds. Restore it, or give "
            "another --workdir."
        ) from None


def read_data_info(workdir) -> dict | None:
    """data_info.json (units, image size, pixel and voxel spacing, data root), or None."""
    return read_record(workdir, DATA_INFO)


def read_results(workdir) -> dict | None:
    """results.json of a finished run, or None."""
    return read_record(workdir, RESULTS)


def steps(workdir, folder: str = CHECKPOINTS) -> list[int]:
    """The committed steps in `<workdir>/<folder>` (checkpoints/ or best/), oldest first.

    Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
    folder named by its number alone is a whole step.
    """
    parent = Path(workdir) / folder
    if not parent.is_dir():
        return []
    return sorted(int(p.name) for p in parent.iterdir() if p.name.isdigit() and p.is_dir())


def latest_step(workdir) -> int | None:
    """The newest checkpointed step of a workdir, or None: what a reader asks, without Orbax."""
    found = steps(workdir)
    return found[-1] if found else None


def check_writable(workdir) -> None:
    """Fail early, with the path in the message, when outputs cannot be written.

    A real write (flushed to the disk), not permission bits: root passes every permission check,
    while a read-only mount, a full disk or a file in the way still stop it.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"workdir {workdir} is a file, not a folder; choose another")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # A unique name: processes of a multi-host run may share the folder and a pid.
        probe = workdir / f".write_test_{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            probe.unlink(missing_ok=True)  # also when the disk is full
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(workdir) else ""
        error = OSError(f"workdir {workdir} is not writable: {e.strerror or e}{where}")
        error.errno = e.errno  # kept for callers, out of the message a person reads
        raise error from e
