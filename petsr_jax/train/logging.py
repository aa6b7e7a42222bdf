"""What a training reports while it runs: scalars, images per second, its time, a progress bar.

`TrainingLog` is what the loop talks to. Its `MetricWriter` writes scalars to TensorBoard event
files and to `metrics.jsonl` (one JSON line a log step); a run resumed from a checkpoint logs
again the steps it had logged after that checkpoint, so the writer first cuts `metrics.jsonl`
back to the resumed step, and its TensorBoard events start with a purge marker just after it
(TensorBoard then drops the earlier files' events of later steps). Its `ThroughputMeter`
measures images per second over training steps only. `TrainClock` carries the run's wall time
across resumptions through `train_time.json`. Only the primary process writes; on the others the
writers do nothing, so the loop calls them unconditionally.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from petsr_jax.io.files import write_atomic, write_json_atomic
from petsr_jax.run import layout


def is_primary() -> bool:
    """Process 0 of a multi-process run: the one that writes logs, records and results."""
    return jax.process_index() == 0


THROUGHPUT_ABOUT = {
    "train/images_per_s": "training images per second over the train/images_per_s_steps steps "
    "since the previous log or the last evaluation or checkpoint; the first window after a start "
    "or resume (compilation) is not measured, and evaluation and checkpoint time never count",
}


def _drop_metrics_after(workdir: Path, step: int) -> None:
    """Cut metrics.jsonl back to what a run resumed from `step` has not logged yet.

    A run killed after its last checkpoint logged the steps since; resumed from the checkpoint,
    it logs them again (the same values), and the curves would hold them twice. Lines of later
    steps go, as does the "about" line of `step` itself (the resumed run writes its own), and a
    line cut by the kill; the file is replaced in one rename.
    """
    path = workdir / layout.METRICS
    if not path.is_file():
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
        write_atomic(path, "".join(f"{line}\n" for line in kept).encode())


class MetricWriter:
    """Scalars to TensorBoard event files and metrics.jsonl, from `start_step` on (primary
    process only); a resumed run's lines after `start_step` are dropped first."""

    def __init__(self, workdir: Path, start_step: int):
        self.enabled = is_primary()
        if self.enabled:
            from tensorboardX import SummaryWriter

            _drop_metrics_after(workdir, start_step)
            self.tb = SummaryWriter(
                str(workdir / layout.TENSORBOARD), purge_step=start_step + 1 if start_step else None
            )
            self.jsonl = open(workdir / layout.METRICS, "a")

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


class TrainClock:
    """Wall time of training (validation included), carried across resumptions.

    Each checkpoint writes `train_time.json` beside it (`record`); a run resumed from that step
    starts from the seconds recorded there, so time after the last checkpoint of a killed run is
    not counted.
    """

    def __init__(self, workdir: Path, start_step: int):
        self.path = workdir / layout.TRAIN_TIME
        self.before = 0.0
        try:
            recorded = layout.read_record(workdir, layout.TRAIN_TIME) or {}
            if recorded.get("step") == start_step:
                self.before = float(recorded["seconds"])
        except (layout.WorkdirError, KeyError, TypeError, ValueError):
            pass  # no record of this step: its time is not known, and not counted
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def record(self, step: int) -> None:
        """train_time.json for the checkpoint of `step` (primary process only)."""
        if is_primary():
            write_json_atomic(self.path, {"step": step, "seconds": round(self.seconds(), 1)})


class TrainingLog:
    """What the loop reports, in one place: scalars to `MetricWriter`, images per second from a
    `ThroughputMeter`, and a tqdm bar of steps (loss and images/s beside it) when `progress`."""

    def __init__(self, workdir, start_step, total_steps, batch_size, desc, progress: bool):
        self.writer = MetricWriter(workdir, start_step)
        self.throughput = ThroughputMeter(batch_size, start_step)
        self.writer.describe(start_step, THROUGHPUT_ABOUT)
        self.bar = None
        if progress and is_primary() and start_step < total_steps:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc=desc
            )
        self._img_s = "n/a"

    def train(self, step: int, loss: float, grad_norm: float) -> None:
        """The loss and gradient norm of `step`, and the images per second since the last."""
        scalars = {"train/loss": loss, "train/grad_norm": grad_norm}
        if (measured := self.throughput.measure(step)) is not None:
            scalars["train/images_per_s"], scalars["train/images_per_s_steps"] = measured
            self._img_s = f"{measured[0]:.1f}"
        self.writer.write(step, scalars)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3g}", img_s=self._img_s)

    def validation(self, step: int, val: dict) -> None:
        """Validation PSNR and SSIM of bicubic and of the model (`evaluate.summarise`)."""
        self.writer.write(
            step,
            {f"val/{img}/{m}": val[img][m] for img in ("bicubic", "sr") for m in ("psnr", "ssim")},
        )

    def paused(self, step: int) -> None:
        """After an evaluation or a checkpoint: their time is not training time."""
        self.throughput.restart(step)

    def stepped(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
