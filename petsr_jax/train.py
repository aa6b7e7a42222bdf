"""Training: a pure `train_step`, and `train_and_evaluate(config, workdir)` around it.

`train_step(state, batch) -> (state, metrics)` receives high-resolution slices only; the
network input is made inside the jitted step by `degrade(hr, scale)`. It is jitted with explicit
shardings over a 1-D `data` mesh (params replicated, batch split, state donated), so one code path
serves one CPU, several GPUs and several hosts.

`train_and_evaluate` resumes from the latest checkpoint of `workdir` when there is one (a rerun
of the same command after an interruption, `kill -9` included, ends with the same parameters as
an uninterrupted run), evaluates on the validation split every `train.eval_every_steps` keeping the
best params, and evaluates the test split at the end, writing `results.json`, `results.md` and a
figure into the workdir.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from petsr_jax import checkpoint, data, files, sharding
from petsr_jax import workdir as workdir_lib
from petsr_jax.data import mr
from petsr_jax.evaluation import evaluate, report
from petsr_jax.models import conv_module, count_params, create_model
from petsr_jax.task import Task

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so it is saved and restored like any array


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam at the paper's constant learning rate (1e-3 SRCNN, 1e-4 DeepSR)."""
    return optax.adam(config.train.lr)


def init_state(config, model, tx) -> TrainState:
    rng = jax.random.PRNGKey(config.seed)
    init_rng, rng = jax.random.split(rng)
    # Parameter shapes do not depend on the image size: a small dummy and one jitted init
    # compile much faster than tracing every layer eagerly at full size.
    dummy = jnp.zeros((1, 16, 16, config.model.in_channels), jnp.float32)
    params = jax.jit(model.init)(init_rng, dummy)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
    )


def mse_loss(params, model, task: Task, batch, keys):
    """MSE between the network's output for the degraded batch and the task's target.

    `batch["hr"]` is already in the run's domain (`data.to_domain`); `task` degrades it (and
    its neighbours, `batch["context"]`) with one PRNG key per image, and MR guidance
    (`batch["guide"]`) joins the input undegraded.
    """
    return task.loss(model, params, batch, keys)


def make_train_step(model, tx, task: Task):
    """The pure train step for a model, optimizer and task (jit it with `jit_train_step`).

    The state's PRNG key draws the step's stochastic degradation (a scanner's PSF and noise,
    one draw per image) and is split every step, so a resumed run draws what an uninterrupted
    one would.
    """

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        keys = jax.random.split(step_rng, batch["hr"].shape[0])
        loss, grads = jax.value_and_grad(mse_loss)(state.params, model, task, batch, keys)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def jit_train_step(train_step, mesh):
    """`train_step` jitted for the mesh: state replicated and donated, batch split on `data`."""
    rep = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(rep, sharding.batch_sharded(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )


def params_finite(tree) -> bool:
    """True when every leaf of a pytree is finite (checked before a checkpoint is written)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


def _steps(config, num_train_slices: int) -> tuple[int, int]:
    steps_per_epoch = num_train_slices // config.train.batch_size
    if steps_per_epoch < 1:
        raise data.DataError(
            f"{num_train_slices} training slices make no batch of {config.train.batch_size}; "
            "lower train.batch_size"
        )
    return steps_per_epoch, steps_per_epoch * config.train.epochs


def check_workdir(workdir: Path) -> None:
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


# What `report.write_run_outputs` leaves in a finished workdir.
RUN_OUTPUTS = (
    "results.json",
    "results.md",
    "test_scores.json",
    "test_slices.png",
    "training_curves.png",
)

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
    folder = Path(workdir) / "checkpoints"
    existing = sum(1 for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else 0
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


TRAIN_TIME_FILE = "train_time.json"


def _recorded_train_time(workdir: Path, step: int) -> float:
    """Seconds of training before `step`, as recorded beside the checkpoint of that step."""
    try:
        recorded = json.loads((workdir / TRAIN_TIME_FILE).read_text())
    except (OSError, ValueError):
        return 0.0
    return float(recorded["seconds"]) if recorded.get("step") == step else 0.0


def _is_primary() -> bool:
    return jax.process_index() == 0


def _drop_metrics_after(workdir: Path, step: int) -> None:
    """Cut metrics.jsonl back to what a run resumed from `step` has not logged yet.

    A run killed after its last checkpoint logged the steps since; resumed from the checkpoint,
    it logs them again (the same values), and the curves would hold them twice. Lines of later
    steps go, as does the "about" line of `step` itself (the resumed run writes its own), and a
    line cut by the kill; the file is replaced in one rename.
    """
    path = workdir / "metrics.jsonl"
    if not _is_primary() or not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = record["step"] < step or (record["step"] == step and "about" not in record)
        except (ValueError, TypeError, KeyError):
            keep = False
        kept += [line] if keep else []
        dropped += not keep
    if dropped:
        files.write_atomic(path, "".join(f"{line}\n" for line in kept).encode())


class _MetricWriter:
    """Scalars to TensorBoard event files and a JSON-lines file (primary process only)."""

    def __init__(self, workdir: Path):
        self.enabled = _is_primary()
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
            self.jsonl = open(workdir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def describe(self, step: int, about: dict[str, str]) -> None:
        """What some scalars measure, as an `{"step", "about"}` line of metrics.jsonl only."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, "about": about}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


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


THROUGHPUT_ABOUT = {
    "train/images_per_s": "training images per second over the train/images_per_s_steps steps "
    "since the previous log or the last evaluation or checkpoint; the first window after a start "
    "or resume (compilation) is not measured, and evaluation and checkpoint time never count",
}


class ThroughputMeter:
    """Training images per second over windows that hold training steps only.

    A window opens after each measurement and after whatever is not training (an evaluation, a
    checkpoint), so that time is never counted; the first window after a start or resume holds
    the compilation of the train step and is not measured. Measure right after a host sync (the
    loss read at a log step), so the window's steps have really run.
    """

    def __init__(self, batch_size: int, step: int):
        self.batch_size = batch_size
        self.restart(step)
        self._compiling = True

    def restart(self, step: int) -> None:
        """Open a new window after `step`, e.g. once an evaluation or a checkpoint is done."""
        self._start, self._step, self._compiling = time.perf_counter(), step, False

    def measure(self, step: int) -> tuple[float, int] | None:
        """(images per second, steps) of the window ending at `step`, or None when the window
        held compilation or no step; opens the next window."""
        seconds, steps = time.perf_counter() - self._start, step - self._step
        training_only = not self._compiling and steps >= 1
        self.restart(step)
        return (steps * self.batch_size / max(seconds, 1e-9), steps) if training_only else None


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


def train_and_evaluate(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints); return the results dict.

    The workdir is locked for the whole call (`workdir.WorkdirLock`, by the primary process), so
    a second training of the same folder stops at once instead of mixing two runs.
    """
    from petsr_jax.config import validate

    validate(config)
    workdir = Path(workdir).absolute()
    workdir_lib.check_not_data(workdir)  # before anything is written into someone's data
    lock = workdir_lib.WorkdirLock(workdir) if _is_primary() else contextlib.nullcontext()
    check_workdir(workdir)
    with lock:
        return _train_and_evaluate(config, workdir, progress)


def _train_and_evaluate(config, workdir: Path, progress: bool) -> dict:
    # Before config.json is rewritten below and before a finished run's results are returned:
    # another config must not resume, or be answered by, this workdir's run.
    workdir_lib.check_same_run(workdir, config)
    results_path = workdir / "results.json"

    root = data.resolve_root(config)
    split = data.resolve_split(config, root)
    # The neighbours a task needs do not depend on the data's voxel size, its PSF in voxels does.
    neighbours = Task.from_config(config, spacing_mm=(1.0, 1.0, 1.0)).neighbours
    sets = {
        name: data.build_slice_set(
            root,
            split[name],
            eval_split=name != "train",
            rule=config.data.eval_slices,
            guidance=mr.guidance_channels(config),
            neighbours=neighbours,
        )
        # Test read before training too (cached, memory-mapped): a test scan or T1 that cannot
        # be used stops the run now, not after hours of training.
        for name in ("train", "val", "test")
    }
    train_set, val_set, test_set = sets["train"], sets["val"], sets["test"]
    data.slices.check_run_sets(
        root, config.train.batch_size, train=train_set, val=val_set, test=test_set
    )
    task = Task.from_config(config, spacing_mm=train_set.voxel_spacing)
    if not (config.task.degradation == "scanner" and config.scanner.data == "phantoms"):
        _say_how_slices_are_scored(root, val_set, config.data.eval_slices)  # phantoms: no brain
    steps_per_epoch, total_steps = _steps(config, len(train_set))
    eval_every = config.train.eval_every_steps or steps_per_epoch
    ckpt_every = config.train.checkpoint_every_steps or steps_per_epoch

    # A run interrupted while writing its outputs has results.json but not all of the rest; it
    # is evaluated again from its final checkpoint (no training) and its outputs rewritten.
    # A finished run scored with other evaluation settings is scored again, not retrained.
    recorded = workdir_lib.recorded_config(workdir)
    if all((workdir / name).exists() for name in RUN_OUTPUTS) and recorded is not None:
        done = json.loads(results_path.read_text())
        if done.get("step") == total_steps and not workdir_lib.differences(recorded, config):
            log.info("%s is finished (step %d); not training again", workdir, total_steps)
            return done

    if _is_primary():
        workdir_lib.write_run_record(
            workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )
        files.write_json_atomic(workdir / "config.json", json.loads(config.to_json()))
        files.write_json_atomic(workdir / "split.json", split)
        # What enhancement checks a new scan against (units, pixel spacing).
        spacing = train_set.pixel_spacing
        files.write_json_atomic(
            workdir / "data_info.json",
            {
                "units": train_set.units,
                "image_size": list(train_set.hr.shape[1:]),
                "pixel_spacing_mm": None if spacing is None else list(spacing),
                # The voxel size a scanner task's PSF was converted with (slice, row, column).
                "voxel_spacing_mm": train_set.voxel_spacing,
                "root": str(root),
            },
        )

    mesh = sharding.make_mesh()
    model = create_model(config)
    conv = conv_module(config.model.conv)  # "auto" picks per machine: the log says which
    log.info(
        "convolutions: %s.%s (model.conv=%s)", conv.__module__, conv.__name__, config.model.conv
    )
    tx = make_optimizer(config)
    state = init_state(config, model, tx)
    state = sharding.replicate(state, mesh)
    check_free_space(workdir, state, config.train.keep_checkpoints)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)

    ds = data.train_dataset(
        data.SliceSource.of(train_set),
        batch_size=config.train.batch_size,
        seed=config.seed,
        crop_size=config.data.crop_size,
        flip=config.data.flip,
        domain=config.data.domain,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = data.train_iterator(ds, config.data.num_workers)

    start_step = ckpts.latest_step() or 0
    if start_step:
        state, iter_state = ckpts.restore(start_step, state)
        train_iter.set_state(iter_state)
        log.info("resumed from step %d of %s", start_step, workdir)

    step_fn = jit_train_step(make_train_step(model, tx, task), mesh)
    _drop_metrics_after(workdir, start_step)  # a resumed run logs those steps again
    writer = _MetricWriter(workdir)
    n_params = count_params(state.params)
    bar = None
    if progress and _is_primary() and start_step < total_steps:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            desc=f"{config.model.name} {task.degradation.label}",
        )
    # Wall time of training (validation included), carried across resumptions through a sidecar
    # written with each checkpoint; time after the last checkpoint of a killed run is not counted.
    time_before = _recorded_train_time(workdir, start_step)
    loop_start = time.perf_counter()
    throughput = ThroughputMeter(config.train.batch_size, start_step)
    writer.describe(start_step, THROUGHPUT_ABOUT)
    img_s = "n/a"
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = sharding.local_batch_to_global(next(train_iter), mesh)
            state, step_metrics = step_fn(state, batch)
            if step % config.train.log_every_steps == 0 or step == total_steps:
                loss = float(step_metrics["loss"])  # the only host sync of the loop
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at step {step}; stopped. The last good checkpoint "
                        f"(step {ckpts.latest_step()}) in {workdir / 'checkpoints'} is intact; "
                        "lower train.lr or check the data."
                    )
                scalars = {"train/loss": loss, "train/grad_norm": float(step_metrics["grad_norm"])}
                if (measured := throughput.measure(step)) is not None:
                    scalars["train/images_per_s"], scalars["train/images_per_s_steps"] = measured
                    img_s = f"{measured[0]:.1f}"
                writer.write(step, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3g}", img_s=img_s)
            if step % eval_every == 0 or step == total_steps:
                val = evaluate.summarise(
                    evaluate.evaluate_run(
                        state.params,
                        val_set,
                        config,
                        model=model,
                        task=task,
                        mesh=mesh,
                        with_lpips=False,
                    ),
                    val_set.patient,
                )
                writer.write(
                    step,
                    {
                        f"val/{img}/{m}": val[img][m]
                        for img in ("bicubic", "sr")
                        for m in ("psnr", "ssim")
                    },
                )
                if not math.isfinite(val["sr"]["psnr"]):
                    raise TrainingDiverged(f"validation PSNR is {val['sr']['psnr']} at step {step}")
                ckpts.save_best(step, state.params, val["sr"]["psnr"])
                throughput.restart(step)
            if step % ckpt_every == 0 or step == total_steps:
                if not params_finite(state.params):
                    raise TrainingDiverged(
                        f"parameters became non-finite before step {step}; checkpoint not written, "
                        f"the last good one (step {ckpts.latest_step()}) is intact"
                    )
                ckpts.save(step, state, train_iter.get_state())
                if _is_primary():
                    seconds = time_before + time.perf_counter() - loop_start
                    files.write_json_atomic(
                        workdir / TRAIN_TIME_FILE, {"step": step, "seconds": round(seconds, 1)}
                    )
                throughput.restart(step)
            if bar is not None:
                bar.update(1)
        ckpts.wait()
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpts.wait()

    # The params scored and loaded by default: the best validation PSNR's, or the last step's
    # (`eval.weights="final"`, the authors' choice).
    params, best_step = None, total_steps
    if config.eval.weights == "best":
        params, best_step = ckpts.restore_best(state.params), ckpts.best_step()
    if params is None:
        params, best_step = state.params, total_steps
    ckpts.close()

    scores = evaluate.evaluate_run(params, test_set, config, model=model, task=task, mesh=mesh)
    results = {
        "model": config.model.name,
        "scale": config.scale,
        "step": total_steps,
        "best_step": int(best_step),
        "weights": config.eval.weights,
        "domain": config.data.domain,
        "degradation": config.task.degradation,
        "task": task.describe(),
        "num_params": n_params,
        "brain_mask": test_set.mask is not None,
        "eval_slices": data.eval_slices_description(
            config.data.eval_slices, test_set.mask is not None
        ),
        "train_time_s": round(time_before + time.perf_counter() - loop_start, 1),
        "test": evaluate.summarise(scores, test_set.patient),
    }
    results["regional"] = _regional(params, root, split["test"], config, model, task)
    if _is_primary():
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
