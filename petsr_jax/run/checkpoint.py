"""Orbax checkpoints of a run: the last few full states, and the best params by validation PSNR.

`<workdir>/checkpoints/<step>/` holds the train state (params, optimizer state, step, RNG) and
the Grain iterator position, so a rerun resumes exactly where the last save left off.
`<workdir>/best/<step>/` holds params only, kept for the best validation PSNR. Orbax writes a step
into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a run killed mid-save (even by
`kill -9`) leaves the previous step as the latest restorable one.

With several processes every process calls `save` and `restore`; Orbax writes each process's
shards and process 0 the metadata. The Grain iterator state is saved once, by process 0: it counts
global batches (`{"next_index": n}`), the same on every process, because each process reads its
share of every global batch (`data.train_dataset`). For the same reason a run can resume with a
different number of processes.

Restoring checks the checkpoint's tree against the model first, so a checkpoint of another model
or config is named as such instead of surfacing as an Orbax shape error; anything Orbax cannot
read is reported as a damaged step, with the earlier steps to fall back to. Damaged best params
fall back to the latest full state with a warning naming both, as `which="last"` would read.

Every step records, in its Orbax custom metadata, the config.json the run was trained with, so
`check_config_unedited` can tell a config.json edited after training (scale 8 → 16: the params
would load and score as a 16× model) and name the fields that differ.

`check_free_space` refuses, before training, a disk that cannot hold the checkpoints a run keeps.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from petsr_jax.run import identity, layout
from petsr_jax.run.record import never_checkpointed


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run; the message says why and what to do."""


# How many differing leaves a mismatch message lists before summarising the rest.
_MAX_LISTED = 6
# Key of the trained config in each step's Orbax custom metadata.
CONFIG_METADATA_KEY = "petsr_jax_config"
# Where Orbax keeps a step's metadata (custom metadata included), read as plain JSON so that
# checking a workdir's record needs no checkpoint manager.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_orphaned_reads_ignored = False


def _is_orphaned_read_error(error: BaseException | None) -> bool:
    """Whether `error` is one of the reports a failed restore leaves behind (see below)."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    # The sibling reads that failed too: TensorStore errors, named by their spec.
    text = str(error)
    return "tensorstore_spec" in text or "See full TensorStore details" in text


class _OrphanedReadFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for TensorStore reads (see below)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in str(record.msg) and _is_orphaned_read_error(error))


def _ignore_orphaned_reads() -> None:
    """Drop the reports of reads orphaned by a failed restore.

    When one file of a step cannot be read, Orbax stops and closes its asyncio loop while the
    other reads are still in flight. As each completes, TensorStore reports its callback's
    `RuntimeError: Event loop is closed` to `sys.unraisablehook`; reads that failed as well are
    reported, whenever the garbage collector reaches them, by asyncio's logger ("Task exception
    was never retrieved") or, for coroutines closed mid-read, to `sys.unraisablehook` again: a
    traceback each, hundreds of lines around the one-line error that says what to do. Only these
    reports are dropped; every other unraisable exception and log record passes. The coroutines
    of the abandoned reads are collected unawaited, a `RuntimeWarning` each, ignored too.
    """
    global _orphaned_reads_ignored
    # Again on every call: a caller's `warnings.catch_warnings` may have dropped the filter.
    warnings.filterwarnings(
        "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
    )
    if _orphaned_reads_ignored:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_orphaned_read_error(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrphanedReadFilter())
    _orphaned_reads_ignored = True


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(tree):
    """Restore targets: shapes and dtypes of `tree`, placed as its leaves are.

    Leaves without a sharding (numpy arrays, bare `ShapeDtypeStruct`s) go to this process's first
    device: Orbax would otherwise fall back to the saved sharding, whose devices (another GPU
    count, another host) need not exist here.
    """

    def target(x):
        sharding = getattr(x, "sharding", None) or _default_sharding()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(target, tree)


def _shapes(tree) -> dict[str, tuple]:
    """`"params/conv_in/kernel"`-style path → shape of every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out["/".join(_key_name(k) for k in path)] = tuple(getattr(leaf, "shape", ()))
    return out


def _key_name(key) -> str:
    # Dict keys, dataclass / named-tuple fields and sequence indices name the same thing in a
    # live tree and in Orbax's saved metadata (which stores named tuples as dicts).
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def describe_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """What differs between a checkpoint's and a model's `path → shape` maps, or None."""
    problems = []
    only_saved = sorted(set(saved) - set(expected))
    only_expected = sorted(set(expected) - set(saved))
    if only_saved:
        problems.append(
            f"{len(only_saved)} arrays in the checkpoint that this model lacks "
            f"({_listing(only_saved)})"
        )
    if only_expected:
        problems.append(
            f"{len(only_expected)} arrays of this model missing from the checkpoint "
            f"({_listing(only_expected)})"
        )
    reshaped = [k for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
    if reshaped:
        described = [f"{k}: {saved[k]} saved, {expected[k]} expected" for k in reshaped]
        problems.append(f"{len(reshaped)} arrays of another shape ({_listing(described)})")
    return "; ".join(problems) or None


def _listing(items: list[str]) -> str:
    return ", ".join(items[:_MAX_LISTED]) + (", ..." if len(items) > _MAX_LISTED else "")


def _saved_shapes(item_dir: Path) -> dict[str, tuple] | None:
    """`path → shape` of a saved pytree item from its metadata; None when that is unreadable."""
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(item_dir)
    except Exception:  # a damaged _METADATA: the restore itself reports it as damage
        return None
    tree = getattr(metadata, "tree", metadata)
    return _shapes(tree)


def _under(shapes: dict[str, tuple], prefix: str) -> dict[str, tuple]:
    return {k[len(prefix) + 1 :]: v for k, v in shapes.items() if k.startswith(prefix + "/")}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    text = text.splitlines()[0] if text else ""
    # TensorStore appends a repr of its whole spec to read errors; the sentence before says it.
    text = text.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0]
    return f"{type(error).__name__}: {text}".rstrip(": ")


def _check_structure(item_dir: Path, like, what: str) -> None:
    saved = _saved_shapes(item_dir)
    if saved is None:
        return
    expected = _shapes(like)
    if what == "params of a full state":
        saved = _under(saved, "params")
    mismatch = None
    if what == "state":
        # The params tell models apart; the optimizer state repeats their differences.
        mismatch = describe_mismatch(_under(saved, "params"), _under(expected, "params"))
    mismatch = mismatch or describe_mismatch(saved, expected)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {item_dir.parent} was written by a different model or config than the "
            f"one restoring it: {mismatch}. Restore it with the config it was trained with "
            f"(config.json in its workdir), or train this config in a new workdir."
        )


def _damaged(step_dir: Path, error: BaseException, earlier: list[int]) -> CheckpointError:
    if not earlier:
        fallback = "No earlier step is kept; start a new workdir."
    else:
        older = sorted(earlier)[:-1]
        kept = f" (steps {', '.join(map(str, older))} are kept too)" if older else ""
        fallback = (
            f"Delete {step_dir} to resume from step {max(earlier)}{kept}, or start a new workdir."
        )
    return CheckpointError(
        f"checkpoint {step_dir} cannot be read; its files are damaged or incomplete "
        f"({_first_line(error)}). {fallback}"
    )


def _run_config(workdir: Path) -> dict | None:
    """The config.json of a workdir, or None when it is absent or unreadable (then there is no
    record to keep, and `identity.check_same_run` reports the damage)."""
    try:
        return layout.read_config(workdir)
    except layout.WorkdirError:
        return None


def trained_config(step_dir: Path) -> dict | None:
    """The config a checkpoint step was trained with (its custom metadata), or None for a step
    written before steps recorded it."""
    try:
        metadata = json.loads((Path(step_dir) / _STEP_METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    record = (metadata.get("custom_metadata") or {}).get(CONFIG_METADATA_KEY)
    return record if isinstance(record, dict) else None


def _step_dirs(workdir: Path) -> list[Path]:
    """Every committed step of `checkpoints/` and `best/`, newest first."""
    steps = [
        Path(workdir) / folder / str(step)
        for folder in (layout.CHECKPOINTS, layout.BEST)
        for step in layout.steps(workdir, folder)
    ]
    return sorted(steps, key=lambda p: -int(p.name))


def check_config_unedited(workdir, recorded: dict | None = None) -> None:
    """Refuse a workdir whose config.json no longer says what its checkpoints were trained with.

    `recorded` is the workdir's config.json (read when not given). Only fields that change the
    trained parameters count (`identity.defining_differences`), and only fields both records
    hold (a field added to the project since is not an edit). Raises `CheckpointError` naming
    each edited field with both values, before anything is restored or written.
    """
    workdir = Path(workdir)
    recorded = _run_config(workdir) if recorded is None else recorded
    if recorded is None:
        return
    for step_dir in _step_dirs(workdir):
        trained = trained_config(step_dir)
        if trained is None:
            continue
        rows = identity.edited_fields(trained, recorded)
        if rows:
            listed = "; ".join(rows[:_MAX_LISTED]) + ("; ..." if len(rows) > _MAX_LISTED else "")
            raise CheckpointError(
                f"{workdir / layout.CONFIG} was edited after training: {listed}. The params in "
                f"{step_dir.parent.name}/{step_dir.name} were trained with the first values; put "
                "them back in config.json, or train the edited config in another workdir."
            )
        return  # every step of one run records the same config: the newest tells


def _manager_options(**kwargs) -> ocp.CheckpointManagerOptions:
    # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp`; it is never restored from, and
    # cleaning it when the run restarts keeps the workdir free of half-written folders.
    return ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True, **kwargs)


def _checked_step(manager: ocp.CheckpointManager, step: int, item: str, like) -> Path:
    """The folder of `step`, whose saved `item` ("state" or "params") has been checked against
    `like` (`CheckpointError` for another model), ready for a restore that may fail."""
    step_dir = Path(manager.directory) / str(step)
    _check_structure(step_dir / item, like, item)
    _ignore_orphaned_reads()
    return step_dir


class Checkpoints:
    """The two checkpoint managers of a workdir.

    Every step saved records `run_config` — by default the workdir's config.json, which a
    training writes from its config before it saves anything — in its custom metadata
    (`check_config_unedited`).
    """

    def __init__(self, workdir: str | Path, keep: int = 3, run_config: dict | None = None):
        workdir = Path(workdir).absolute()
        record = run_config if run_config is not None else _run_config(workdir)
        self._metadata = None if record is None else {CONFIG_METADATA_KEY: record}
        # Both managers save the same step numbers; with several processes their barriers are
        # named after the step, so without distinct prefixes the second save of a step meets
        # the first one's barrier "already ongoing" and times out.
        self.last = ocp.CheckpointManager(
            workdir / layout.CHECKPOINTS,
            options=_manager_options(
                max_to_keep=keep,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="petsr_last"
                ),
            ),
            item_names=("state", "data_iter"),
        )
        self.best = ocp.CheckpointManager(
            workdir / layout.BEST,
            options=_manager_options(
                max_to_keep=1,
                best_fn=lambda m: m["val_psnr"],
                best_mode="max",
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="petsr_best"
                ),
            ),
            item_names=("params",),
        )

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def save(self, step: int, state, data_iter_state: dict) -> None:
        self.last.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iter=ocp.args.JsonSave(data_iter_state),
            ),
            custom_metadata=self._metadata,
        )

    def restore(self, step: int, like_state):
        """(state, data_iter_state) of `step`, laid out like `like_state` (same shardings)."""
        step_dir = _checked_step(self.last, step, "state", like_state)
        try:
            restored = self.last.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(like_state)),
                    data_iter=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            earlier = [s for s in self.last.all_steps() if s < step]
            raise _damaged(step_dir, e, earlier) from e
        return restored.state, restored.data_iter

    def save_best(self, step: int, params, val_psnr: float) -> None:
        self.best.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
            metrics={"val_psnr": float(val_psnr)},
            custom_metadata=self._metadata,
        )

    def best_step(self) -> int | None:
        return self.best.best_step()

    def restore_best(self, like_params):
        """The best params, or None when there are none — or when they cannot be read: then a
        warning names the damaged step, and the caller scores the params it holds instead."""
        step = self.best.best_step()
        if step is None:
            return None
        step_dir = _checked_step(self.best, step, "params", like_params)
        try:
            restored = self.best.restore(
                step,
                args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like_params))),
            )
        except Exception as e:
            warnings.warn(
                f"checkpoint {step_dir} cannot be read; its files are damaged or incomplete "
                f"({_first_line(e)}). Using the run's last params instead of the best.",
                stacklevel=2,
            )
            return None
        return restored.params

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()


def restore_params(workdir: str | Path, like_params, which: str = "best"):
    """Params of a finished workdir without flags or a train state (notebooks, enhancement).

    `which="best"` takes the best validation checkpoint, falling back to the latest full state
    when there is none, or with a warning naming both when its files cannot be read; `"last"`
    takes the latest full state. Only the params are read (a partial restore).
    `like_params` gives shapes, dtypes and placement (arrays or `jax.ShapeDtypeStruct`s); leaves
    without a sharding land on this process's first device, whatever devices saved them.
    Raises `CheckpointError` for a workdir without checkpoints, a checkpoint of another model,
    or damaged files.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which: expected 'best' or 'last', got {which!r}")
    workdir = Path(workdir).absolute()
    like = _abstract(like_params)
    _ignore_orphaned_reads()
    # Managers that create nothing: reading a folder that is not a workdir must not make one.
    # (Orbax's read_only option would do too, but warns on every restore.)
    no_create = ocp.CheckpointManagerOptions(create=False)
    damaged_best = None  # (step folder, error) of best params that cannot be read
    if which == "best" and (workdir / layout.BEST).is_dir():
        with ocp.CheckpointManager(
            workdir / layout.BEST, options=no_create, item_names=("params",)
        ) as mngr:
            step = mngr.latest_step()
            if step is not None:
                step_dir = workdir / layout.BEST / str(step)
                _check_structure(step_dir / "params", like, "params")
                try:
                    return mngr.restore(
                        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(like))
                    ).params
                except Exception as e:
                    damaged_best = (step_dir, e)
    no_checkpoint = CheckpointError(
        f"{workdir} holds no checkpoint (looked in best/ and checkpoints/); is it the workdir "
        "of a training run?"
    )
    if (workdir / layout.CONFIG).is_file():  # it is: a training that never saved a step
        no_checkpoint = CheckpointError(never_checkpointed(workdir))
    if damaged_best is not None:  # nothing to fall back to: the damage is the error
        no_checkpoint = _damaged(*damaged_best, [])
    if not (workdir / layout.CHECKPOINTS).is_dir():
        raise no_checkpoint
    with ocp.CheckpointManager(
        workdir / layout.CHECKPOINTS, options=no_create, item_names=("state", "data_iter")
    ) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise no_checkpoint
        step_dir = workdir / layout.CHECKPOINTS / str(step)
        _check_structure(step_dir / "state", like, "params of a full state")
        target = {"params": like}
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                ),
            )
        except Exception as e:
            earlier = [s for s in mngr.all_steps() if s < step]
            raise _damaged(step_dir, e, earlier) from e
        if damaged_best is not None:
            best_dir, error = damaged_best
            warnings.warn(
                f"checkpoint {best_dir} cannot be read; its files are damaged or incomplete "
                f"({_first_line(error)}). Using the latest full state, {step_dir}, instead "
                "(--checkpoint=last, or which='last', reads it without this warning).",
                stacklevel=2,
            )
        return restored.state["params"]


# Room for metrics, TensorBoard events, the figure and result files beside the checkpoints.
OUTPUT_MARGIN_BYTES = 16 * 2**20


def check_free_space(workdir: Path, state, keep: int) -> None:
    """Fail before training when the workdir's disk cannot hold the run's checkpoints.

    Orbax writes a new step before deleting the oldest, so a run holds up to `keep + 1` full
    states (params and optimizer state) and one params-only best checkpoint; steps already in
    the workdir are replaced, not added.
    """
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    existing = len(layout.steps(workdir))
    needed = max(keep + 1 - existing, 1) * state_bytes + params_bytes + OUTPUT_MARGIN_BYTES
    free = shutil.disk_usage(workdir).free
    if free < needed:
        error = OSError(
            f"workdir {workdir} has {free / 2**20:.1f} MiB free; this run's checkpoints and "
            f"outputs need about {needed / 2**20:.1f} MiB. Free some space or choose another "
            "--workdir"
        )
        error.errno = errno.ENOSPC
        raise error
