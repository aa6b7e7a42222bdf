"""`load(workdir)`: a training workdir's config and params as a `SuperResolver`, no flags.

A workdir written before a config field existed still loads (the field takes its default); a
folder that is not a run, a run that never reached a checkpoint, or a misspelt workdir is
answered with what exists and the command that makes it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import ml_collections

from petsr_jax.config import base_config
from petsr_jax.inference.errors import InferenceError
from petsr_jax.inference.resolver import SuperResolver
from petsr_jax.models import abstract_params, create_model
from petsr_jax.run import checkpoint, layout, record


def load(workdir, *, which: str | None = None, batch_size: int | None = None) -> SuperResolver:
    """The trained model of a workdir, ready to apply to slices, volumes and scans.

    Reads `config.json` (written when the run started) and restores the params with Orbax:
    `which="best"` takes the best validation checkpoint and falls back to the latest full state,
    `"last"` takes the latest state; the default is the params the run scored (`eval.weights`:
    "best", or "final" → "last"). No absl flags are needed. `batch_size` (slices per device
    call) defaults to the run's `eval.batch_size`.

    Raises:
      InferenceError: the folder is not a training workdir.
      petsr_jax.run.checkpoint.CheckpointError: it holds no restorable checkpoint for its config,
        or its config.json was edited after training (the fields named).
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    checkpoint.check_config_unedited(workdir)  # else the params load as another model
    if which is None:
        which = "last" if config.eval.get("weights", "best") == "final" else "best"
    model = create_model(config)
    like = abstract_params(
        model,
        int(config.model.get("in_channels", 1)),
        jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    )
    try:
        params = checkpoint.restore_params(workdir, like, which=which)
    except checkpoint.CheckpointError:
        raise
    except Exception as error:  # Orbax raises many types for corrupt or mismatched trees
        raise checkpoint.CheckpointError(
            f"{workdir}: cannot restore the {which} params for the model in config.json "
            f"({type(error).__name__}: {error})"
        ) from error
    unfinished = record.progress(workdir)
    if unfinished:
        checkpoint_kind = "best checkpoint" if which == "best" else "latest checkpoint"
        warnings.warn(f"{unfinished}; using the {checkpoint_kind} so far", stacklevel=2)
    return SuperResolver(
        config, params, workdir=workdir, data_info=read_data_info(workdir), batch_size=batch_size
    )


def read_config(workdir) -> ml_collections.ConfigDict:
    """The locked config a run was trained with, from `<workdir>/config.json`."""
    path = Path(workdir) / layout.CONFIG
    if not Path(workdir).is_dir():
        raise InferenceError(missing_workdir(workdir))
    try:
        fields = layout.read_record(workdir, layout.CONFIG)
    except layout.WorkdirError as error:
        raise InferenceError(str(error)) from None
    if fields is None:
        raise InferenceError(
            f"{path}: missing; a training workdir gets {layout.CONFIG} when launch/main.py "
            "starts the run"
        )
    for section, key in (("model", "name"), (None, "scale")):
        holder = fields.get(section, {}) if section else fields
        if not isinstance(holder, dict) or key not in holder:
            name = f"{section}.{key}" if section else key
            raise InferenceError(f"{path}: field {name} is missing; not a petsr_jax config")
    try:
        defaults = base_config(fields["model"]["name"])
    except ValueError as error:
        raise InferenceError(f"{path}: field model.name: {error}") from None
    # Older runs called flax's convolutions "xla"; the name changed, the parameters did not.
    if fields["model"].get("conv") == "xla":
        fields["model"]["conv"] = "flax"
    # The saved values win; defaults only fill fields added to the project after the run, so
    # an older workdir still loads.
    config = _overlay(defaults, fields)
    config.lock()
    return config


def missing_workdir(workdir) -> str:
    """`<workdir>: no such workdir`, naming the nearest workdirs beside it (folders holding a
    config.json, by name) with the commands that trained them, and the command that trains
    `workdir` itself where its name is a variant's default (`runs/deepsr_x8_small_b6`)."""
    import difflib

    from petsr_jax.cli import variant_workdirs

    workdir = Path(workdir)
    parent = workdir.parent
    runs = []
    if parent.is_dir():
        runs = sorted(p.name for p in parent.iterdir() if (p / layout.CONFIG).is_file())
    text = f"{workdir}: no such workdir"
    close = difflib.get_close_matches(workdir.name, runs, n=3, cutoff=0.6)
    if close:
        named = []
        for name in close:
            command = record.recorded_command(parent / name)
            named.append(str(parent / name) + (f" (trained by: {command})" if command else ""))
        text += f"; nearest: {'; '.join(named)}"
    elif runs:
        shown = ", ".join(runs[:5]) + (", ..." if len(runs) > 5 else "")
        text += f"; runs in {parent}: {shown}"
    trains = {Path(path).name: command for path, command in variant_workdirs().items()}
    if workdir.name in trains:
        where = "" if parent.name == "runs" else f" --workdir={workdir}"
        text += f"; to train it: {trains[workdir.name]}{where}"
    elif not runs:
        text += (
            "; train one first, e.g. python launch/main.py "
            "--config=configs/deepsr.py:scale=8,quick (it writes runs/deepsr_x8_small_b6)"
        )
    return text


def _overlay(defaults: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), ml_collections.ConfigDict):
            _overlay(defaults[key], value)
            continue
        if key in defaults:
            del defaults[key]  # the saved type wins too (a field whose type changed since)
        defaults[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return defaults


def read_data_info(workdir) -> dict | None:
    """`<workdir>/data_info.json` ({"units", "image_size", "pixel_spacing_mm", "root"}), or
    None when absent."""
    try:
        return layout.read_data_info(workdir)
    except layout.WorkdirError as error:
        raise InferenceError(str(error)) from None
