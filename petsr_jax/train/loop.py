"""`train_and_evaluate(config, workdir)`: the method section, read top to bottom.

Read the data of each split, train the network with Adam on the MSE of its output for the
degraded high-resolution slices, evaluate the validation split every `train.eval_every_steps`
keeping the params of the best validation PSNR, and score the test split at the end, writing
`results.json`, `results.md` and figures into the workdir.

The run resumes from the latest checkpoint of `workdir` when there is one (a rerun of the same
command after an interruption, `kill -9` included, ends with the same parameters as an
uninterrupted run); a finished run is answered from its results without training again. What a
workdir holds, and which run, is `petsr_jax.run`'s; the pure jitted step is `step.py`'s, and
what the loop reports while it runs is `logging.py`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import optax

from petsr_jax import data, sharding
from petsr_jax.data import mr
from petsr_jax.evaluation import evaluate, report
from petsr_jax.io.files import write_json_atomic
from petsr_jax.models import conv_module, count_params, create_model
from petsr_jax.run import checkpoint, identity, layout
from petsr_jax.run.lock import WorkdirLock
from petsr_jax.run.record import write_run_record
from petsr_jax.task import Task
from petsr_jax.train.logging import TrainClock, TrainingLog, is_primary
from petsr_jax.train.step import (
    TrainState,
    init_state,
    jit_train_step,
    make_optimizer,
    make_train_step,
    params_finite,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


def train_and_evaluate(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints); return the results dict.

    The workdir is locked for the whole call (`run.lock.WorkdirLock`, by the primary process),
    so a second training of the same folder stops at once instead of mixing two runs.
    """
    from petsr_jax.config import validate

    validate(config)
    workdir = Path(workdir).absolute()
    identity.check_not_data(workdir)  # before anything is written into someone's data
    lock = WorkdirLock(workdir) if is_primary() else contextlib.nullcontext()
    layout.check_writable(workdir)
    with lock:
        # Before config.json is rewritten and before a finished run's results are returned:
        # another config must not resume, or be answered by, this workdir's run.
        identity.check_same_run(workdir, config)
        run = prepare_data(config)
        identity.check_same_data(workdir, run.root)
        done = finished_results(config, workdir, run.total_steps)
        if done is not None:
            log.info("%s is finished (step %d); not training again", workdir, run.total_steps)
            return done
        record_run(config, workdir, run)
        training = build_training(config, workdir, run.train)
        state = train(config, workdir, run, training, progress)
        params, best_step = scored_params(config, training.ckpts, state, run.total_steps)
        return final_evaluation(config, workdir, run, training, params, best_step)


@dataclasses.dataclass(frozen=True)
class RunData:
    """The slices of each split, the task that degrades them, and the run's length in steps."""

    root: Path
    split: dict
    train: data.SliceSet
    val: data.SliceSet
    test: data.SliceSet
    task: Task
    steps_per_epoch: int
    total_steps: int


def prepare_data(config) -> RunData:
    """The split's slice sets (the test set too: a test scan or T1 that cannot be used stops
    the run now, not after hours of training) and the task for the training data's voxels."""
    root = data.resolve_root(config)
    split = data.resolve_split(config, root)
    neighbours = Task.neighbours_before_data(config)
    sets = {
        name: data.build_slice_set(
            root,
            split[name],
            eval_split=name != "train",
            rule=config.data.eval_slices,
            guidance=mr.guidance_channels(config),
            neighbours=neighbours,
            lesions=name == "train" and config.train.get("lesion_weight", 0.0) > 0,
        )
        for name in ("train", "val", "test")
    }
    data.slices.check_run_sets(root, config.train.batch_size, **sets)
    task = Task.from_config(config, spacing_mm=sets["train"].voxel_spacing)
    if not (config.task.degradation == "scanner" and config.scanner.data == "phantoms"):
        _say_how_slices_are_scored(root, sets["val"], config.data.eval_slices)  # phantoms: no brain
    steps_per_epoch = len(sets["train"]) // config.train.batch_size
    if steps_per_epoch < 1:
        raise data.DataError(
            f"{len(sets['train'])} training slices make no batch of {config.train.batch_size}; "
            "lower train.batch_size"
        )
    total_steps = steps_per_epoch * config.train.epochs
    return RunData(
        root, split, **sets, task=task, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )


def _say_how_slices_are_scored(root: Path, val_set, rule: str) -> None:
    """Warn once, before training, when the data root has no brain masks: a person reading the
    results must know that there are no "brain" scores and which slices are scored instead."""
    if val_set.mask is not None:
        return
    log.warning(
        "%s has no brain mask for every validation patient (%s): validation and test are scored "
        'on whole slices only, with no "brain" metrics, on %s',
        root,
        root / "masks" / "<patient>.nii.gz",
        data.eval_slices_description(rule, has_mask=False),
    )


def finished_results(config, workdir: Path, total_steps: int) -> dict | None:
    """The results of a finished run of this config, or None when there is work to do.

    A run interrupted while writing its outputs has results.json but not all of the rest; it is
    evaluated again from its final checkpoint (no training) and its outputs rewritten. A finished
    run scored with other evaluation settings is scored again, not retrained.
    """
    recorded = layout.read_config(workdir)
    if recorded is None or not all((workdir / name).exists() for name in layout.RUN_OUTPUTS):
        return None
    done = layout.read_results(workdir)
    if done.get("step") == total_steps and not identity.differences(recorded, config):
        return done
    return None


def record_run(config, workdir: Path, run: RunData) -> None:
    """run.json, config.json, split.json and data_info.json (what enhancement checks a new scan
    against: units, pixel spacing), by the primary process."""
    if not is_primary():
        return
    write_run_record(workdir, total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch)
    write_json_atomic(workdir / layout.CONFIG, json.loads(config.to_json()))
    write_json_atomic(workdir / layout.SPLIT, run.split)
    spacing = run.train.pixel_spacing
    info = {
        "units": run.train.units,
        "image_size": list(run.train.hr.shape[1:]),
        "pixel_spacing_mm": None if spacing is None else list(spacing),
        # The voxel size a scanner task's PSF was converted with (slice, row, column).
        "voxel_spacing_mm": run.train.voxel_spacing,
        "root": str(run.root),
    }
    write_json_atomic(workdir / layout.DATA_INFO, info)


@dataclasses.dataclass
class Training:
    """What the loop works on: the network, its optimizer and state (restored when resumed),
    the checkpoints that keep it, and the position of the training data."""

    mesh: jax.sharding.Mesh
    model: nn.Module
    tx: optax.GradientTransformation
    state: TrainState
    ckpts: checkpoint.Checkpoints
    train_iter: Any
    start_step: int
    clock: TrainClock  # training time, carried across resumptions


def build_training(config, workdir: Path, train_set: data.SliceSet) -> Training:
    """The model and a fresh train state, replicated over the mesh, or the state and data
    position of the latest checkpoint."""
    mesh = sharding.make_mesh()
    model = create_model(config)
    conv = conv_module(config.model.conv)  # "auto" picks per machine: the log says which
    log.info(
        "convolutions: %s.%s (model.conv=%s)", conv.__module__, conv.__name__, config.model.conv
    )
    tx = make_optimizer(config)
    state = sharding.replicate(init_state(config, model, tx), mesh)
    checkpoint.check_free_space(workdir, state, config.train.keep_checkpoints)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)
    ds = data.train_dataset(
        data.SliceSource.of(train_set),
        batch_size=config.train.batch_size,
        seed=config.seed,
        crop_size=config.data.crop_size,
        flip=config.data.flip,
        domain=data.Domain.of(config),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = data.train_iterator(ds, config.data.num_workers)
    start_step = ckpts.latest_step() or 0
    if start_step:
        state, iter_state = ckpts.restore(start_step, state)
        train_iter.set_state(iter_state)
        log.info("resumed from step %d of %s", start_step, workdir)
    clock = TrainClock(workdir, start_step)
    return Training(mesh, model, tx, state, ckpts, train_iter, start_step, clock)


def train(config, workdir: Path, run: RunData, training: Training, progress: bool):
    """Steps from the start (or resumed) step to the last: log the loss every
    `train.log_every_steps`, validate every `train.eval_every_steps` keeping the best params,
    checkpoint every `train.checkpoint_every_steps`; returns the final state."""
    step_fn = jit_train_step(make_train_step(training.model, training.tx, run.task), training.mesh)
    state, start, total = training.state, training.start_step, run.total_steps
    eval_every = config.train.eval_every_steps or run.steps_per_epoch
    ckpt_every = config.train.checkpoint_every_steps or run.steps_per_epoch
    desc = f"{config.model.name} {run.task.degradation.label}"
    logs = TrainingLog(workdir, start, total, config.train.batch_size, desc, progress)
    try:
        for step in range(start + 1, total + 1):
            batch = sharding.local_batch_to_global(next(training.train_iter), training.mesh)
            state, step_metrics = step_fn(state, batch)
            if step % config.train.log_every_steps == 0 or step == total:
                loss = float(step_metrics["loss"])  # the only host sync of the loop
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at step {step}; stopped. The last good checkpoint "
                        f"(step {training.ckpts.latest_step()}) in "
                        f"{workdir / layout.CHECKPOINTS} is intact; lower train.lr or check "
                        "the data."
                    )
                logs.train(step, loss, float(step_metrics["grad_norm"]))
            if step % eval_every == 0 or step == total:
                validate_and_keep_best(config, run, training, state, step, logs)
                logs.paused(step)
            if step % ckpt_every == 0 or step == total:
                save_checkpoint(training, state, step)
                logs.paused(step)
            logs.stepped()
        training.ckpts.wait()
    finally:
        logs.close()
        training.ckpts.wait()
    return state


def validate_and_keep_best(config, run: RunData, training: Training, state, step, logs) -> None:
    """Validation PSNR / SSIM of the model and of bicubic, logged; the params kept as the best
    when their PSNR is."""
    val = evaluate.summarise(
        evaluate.evaluate_run(
            state.params,
            run.val,
            config,
            model=training.model,
            task=run.task,
            mesh=training.mesh,
            with_lpips=False,
        ),
        run.val.patient,
    )
    logs.validation(step, val)
    if not math.isfinite(val["sr"]["psnr"]):
        raise TrainingDiverged(f"validation PSNR is {val['sr']['psnr']} at step {step}")
    training.ckpts.save_best(step, state.params, val["sr"]["psnr"])


def save_checkpoint(training: Training, state, step: int) -> None:
    """The full state and the data position at `step`, and the training time so far; refused
    for non-finite params, so the last good checkpoint stays the latest."""
    if not params_finite(state.params):
        raise TrainingDiverged(
            f"parameters became non-finite before step {step}; checkpoint not written, "
            f"the last good one (step {training.ckpts.latest_step()}) is intact"
        )
    training.ckpts.save(step, state, training.train_iter.get_state())
    training.clock.record(step)


def scored_params(config, ckpts: checkpoint.Checkpoints, state, total_steps: int):
    """(params, step) scored and loaded by default: the best validation PSNR's, or the last
    step's (`eval.weights="final"`, the authors' choice, or best params that cannot be read)."""
    params, best_step = None, total_steps
    if config.eval.weights == "best":
        params, best_step = ckpts.restore_best(state.params), ckpts.best_step()
    if params is None:
        params, best_step = state.params, total_steps
    ckpts.close()
    return params, best_step


def final_evaluation(config, workdir, run: RunData, training: Training, params, best_step):
    """Test scores of `params` (and regional recovery where the data has the maps), written
    into the workdir with its figures; returns the results dict."""
    model, task, test_set = training.model, run.task, run.test
    scores = evaluate.evaluate_run(
        params, test_set, config, model=model, task=task, mesh=training.mesh
    )
    results = {
        "model": config.model.name,
        "scale": config.scale,
        "step": run.total_steps,
        "best_step": int(best_step),
        "weights": config.eval.weights,
        "domain": config.data.domain,
        "degradation": config.task.degradation,
        "task": task.describe(),
        "num_params": count_params(params),
        "brain_mask": test_set.mask is not None,
        "eval_slices": data.eval_slices_description(
            config.data.eval_slices, test_set.mask is not None
        ),
        "train_time_s": round(training.clock.seconds(), 1),
        "test": evaluate.summarise(scores, test_set.patient),
    }
    results["regional"] = _regional(params, run.root, run.split["test"], config, model, task)
    if is_primary():
        # The figure is predicted on this process's own devices from a host copy of the params:
        # a computation on the global mesh would wait for the other processes, which do not
        # write outputs and are already past this point.
        report.write_run_outputs(
            workdir,
            config,
            results,
            jax.device_get(params),
            test_set,
            model=model,
            task=task,
            mesh=sharding.make_mesh(jax.local_devices()),
            scores=scores,
        )
    return results


def _regional(params, root: Path, patients: list[str], config, model, task) -> dict | None:
    """Grey-matter and lesion activity recovery of the test patients (None without tissue or
    lesion maps): what PSNR cannot show, e.g. an MR-guided model erasing a PET-only lesion."""
    from petsr_jax.evaluation import regional

    recovery = regional.regional_recovery(
        jax.device_get(params),
        root,
        patients,
        model=model,
        task=task,
        mesh=sharding.make_mesh(jax.local_devices()),
        batch_size=config.eval.batch_size,
    )
    if not recovery["rows"]:
        return None
    return {k: recovery[k] for k in ("summary", "units", "rows")}
