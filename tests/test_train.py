"""The train step (degradation inside, loss decreasing, sharded = single device) and full runs
(outputs written, resume = uninterrupted, NaN stop)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import compilation_cache_env

from petsr_jax import data, sharding, train
from petsr_jax.config import build_config
from petsr_jax.data.degrade import degrade
from petsr_jax.models import SRCNN, DeepSR
from petsr_jax.run import checkpoint, layout
from petsr_jax.task import Bicubic, Task

REPO = Path(__file__).resolve().parents[1]


def _hr(n=4, size=24, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = [
        np.exp(-((yy - rng.uniform(0.3, 0.7)) ** 2 + (xx - rng.uniform(0.3, 0.7)) ** 2) / 0.02)
        for _ in range(n)
    ]
    return np.stack(imgs)[..., None].astype(np.float32)


def _state(model, tx, hr):
    params = model.init(jax.random.key(0), hr)["params"]
    return train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )


def test_step_loss_is_mse_of_the_model_on_the_degraded_input():
    model, tx = SRCNN(), optax.adam(1e-3)
    hr = _hr()
    state = _state(model, tx, hr)
    _, metrics = train.make_train_step(model, tx, Task(Bicubic(4)))(state, {"hr": jnp.asarray(hr)})
    sr = model.apply({"params": state.params}, degrade(jnp.asarray(hr), 4))
    np.testing.assert_allclose(metrics["loss"], np.mean((np.asarray(sr) - hr) ** 2), rtol=1e-5)


def test_loss_decreases_on_a_fixed_batch():
    model, tx = DeepSR(num_blocks=2, width=8), optax.adam(1e-3)
    hr = jnp.asarray(_hr())
    state = _state(model, tx, hr)
    step = jax.jit(train.make_train_step(model, tx, Task(Bicubic(4))))
    losses = []
    for _ in range(30):
        state, m = step(state, {"hr": hr})
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30


def test_sharded_step_equals_single_device_step():
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
    model, tx = DeepSR(num_blocks=1, width=8), optax.adam(1e-3)
    hr = _hr(n=8)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        state = sharding.replicate(_state(model, tx, hr), mesh)
        step = train.jit_train_step(train.make_train_step(model, tx, Task(Bicubic(4))), mesh)
        for _ in range(3):
            state, m = step(state, sharding.local_batch_to_global({"hr": hr}, mesh))
        assert len(state.params["conv_in"]["kernel"].sharding.device_set) == len(devices)
        results.append((jax.device_get(state.params), float(m["loss"])))
    (p1, l1), (p4, l4) = results
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _config(root, **overrides):
    arg = f"tiny,data.root={root}," + ",".join(f"{k}={v}" for k, v in overrides.items())
    return build_config("srcnn", arg.rstrip(","))


@pytest.fixture(scope="module")
def finished_run(nifti_root, tiny_srcnn_workdir):
    """The session's finished two-epoch tiny SRCNN run (conftest), with its config."""
    config = _config(nifti_root, **{"train.epochs": 2})
    results = json.loads((tiny_srcnn_workdir / "results.json").read_text())
    return config, tiny_srcnn_workdir, results


def test_a_run_writes_every_output(finished_run):
    config, workdir, results = finished_run
    for name in (
        "results.json",
        "results.md",
        "test_slices.png",
        "test_scores.json",
        "metrics.jsonl",
        "config.json",
        "split.json",
        "training_curves.png",
        "data_info.json",
        "run.json",
    ):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["model"] == "srcnn" and on_disk["scale"] == 8
    for image in ("bicubic", "sr"):
        for metric in ("psnr", "ssim", "psnr_brain", "ssim_brain"):
            assert np.isfinite(on_disk["test"][image][metric])
    assert on_disk["test"]["per_patient"]
    assert "| Output SR (multi-scale SRCNN) |" in (workdir / "results.md").read_text()
    assert (workdir / "checkpoints").is_dir() and (workdir / "best").is_dir()


class _FakeClock:
    """`time` for train.py: each reading advances 1 s; an evaluation or a checkpoint 1000 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now

    def slow(self, fn):
        def run(*args, **kwargs):
            self.now += 1000.0
            return fn(*args, **kwargs)

        return run


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


EVAL_EVERY = 3


@pytest.fixture(scope="module")
def run_without_masks(nifti_root, tmp_path_factory):
    """A run on a data root without brain masks, on a clock where evaluation and checkpoints
    take 1000 s and training steps almost nothing."""
    root = tmp_path_factory.mktemp("no_masks")
    for f in nifti_root.glob("*.nii.gz"):
        shutil.copy(f, root / f.name)
    workdir = tmp_path_factory.mktemp("run_without_masks")
    config = _config(
        root,
        **{"train.epochs": 3, "train.log_every_steps": 2, "train.eval_every_steps": EVAL_EVERY},
    )
    clock, warnings = _FakeClock(), _Warnings()
    logging.getLogger("petsr_jax.train").addHandler(warnings)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train.logging, "time", clock)
            mp.setattr(
                train.loop.evaluate, "evaluate_run", clock.slow(train.loop.evaluate.evaluate_run)
            )
            mp.setattr(checkpoint.Checkpoints, "save", clock.slow(checkpoint.Checkpoints.save))
            train.train_and_evaluate(config, workdir, progress=False)
    finally:
        logging.getLogger("petsr_jax.train").removeHandler(warnings)
    return workdir, warnings.messages


def test_a_run_without_brain_masks_has_no_brain_scores_and_says_so(run_without_masks):
    workdir, warnings = run_without_masks
    results = json.loads((workdir / "results.json").read_text())
    assert results["brain_mask"] is False
    for image in ("bicubic", "sr"):
        assert "psnr" in results["test"][image] and "psnr_brain" not in results["test"][image]
    text = (workdir / "results.md").read_text()
    assert "inside the brain mask" not in text and "PSNR brain" not in text
    assert "no brain mask" in text and "mean intensity" in text
    assert "of 1 patient;" in text
    [warning] = [m for m in warnings if "no brain mask" in m]
    assert "masks" in warning and "mean intensity" in warning


def test_a_run_records_its_curves_pixel_spacing_and_how_it_was_made(run_without_masks):
    workdir, _ = run_without_masks
    info = json.loads((workdir / "data_info.json").read_text())
    assert info["pixel_spacing_mm"] == [2.0, 2.0]  # make_nifti_root's spacing
    results = json.loads((workdir / "results.json").read_text())
    assert results["curves"] == "training_curves.png" and (workdir / results["curves"]).is_file()
    record = json.loads((workdir / results["run_record"]).read_text())
    assert record["total_steps"] == results["step"]
    assert "run.json" in (workdir / "results.md").read_text().strip().splitlines()[-1]


def test_throughput_is_measured_over_training_steps_only(run_without_masks):
    workdir, _ = run_without_masks
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert "train/images_per_s" in records[0]["about"]
    logged = [r for r in records if "train/loss" in r]
    evaluated = [r["step"] for r in records if "val/sr/psnr" in r]
    assert "train/images_per_s" not in logged[0], "the first window holds the compilation"
    measured = [r for r in logged[1:] if "train/images_per_s" in r]
    assert len(measured) == len(logged) - 1
    for r in measured:
        first = r["step"] - r["train/images_per_s_steps"]
        assert not [e for e in evaluated if first < e < r["step"]], f"step {r['step']}: {first}"
    rates = [r["train/images_per_s"] for r in measured]
    # Evaluation and checkpoints take 1000× a training step here: one counted would show.
    assert max(rates) / min(rates) < 5, rates


def test_rerunning_a_finished_run_does_not_train_again(finished_run):
    config, workdir, results = finished_run
    before = (workdir / "metrics.jsonl").read_text()
    assert train.train_and_evaluate(config, workdir, progress=False)["step"] == results["step"]
    assert (workdir / "metrics.jsonl").read_text() == before


def _final_params(workdir, config):
    from petsr_jax.models import create_model

    model = create_model(config)
    like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    return jax.device_get(checkpoint.restore_params(workdir, like, which="last"))


def test_resumed_run_equals_uninterrupted_run(finished_run, nifti_root, tmp_path, monkeypatch):
    config, workdir, _ = finished_run
    real_jit = train.jit_train_step

    def crashing(train_step, mesh):  # the process "dies" before step 6 (a checkpoint at 4)
        jitted, calls = real_jit(train_step, mesh), []

        def wrapped(state, batch):
            calls.append(1)
            if len(calls) > 5:
                raise KeyboardInterrupt("simulated interruption")
            return jitted(state, batch)

        return wrapped

    monkeypatch.setattr(train.loop, "jit_train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, tmp_path, progress=False)
    assert checkpoint.Checkpoints(tmp_path).latest_step() == 4
    monkeypatch.undo()
    before = json.loads((tmp_path / layout.TRAIN_TIME).read_text())
    assert before["step"] == 4 and before["seconds"] > 0
    results = train.train_and_evaluate(config, tmp_path, progress=False)
    assert results["train_time_s"] > before["seconds"]  # the first session's time is counted
    for a, b in zip(
        jax.tree.leaves(_final_params(workdir, config)),
        jax.tree.leaves(_final_params(tmp_path, config)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    nifti_root, tmp_path, monkeypatch
):
    config = _config(nifti_root, **{"train.epochs": 2, "train.log_every_steps": 1})
    real_step = train.make_train_step

    def poisoned(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            bad = jnp.where(state.step >= 6, jnp.nan, 1.0)
            return state.replace(params=jax.tree.map(lambda p: p * bad, state.params)), {
                **metrics,
                "loss": metrics["loss"] * bad,
            }

        return wrapped

    monkeypatch.setattr(train.loop, "make_train_step", poisoned)
    with pytest.raises(train.TrainingDiverged, match="loss became nan at step 6"):
        train.train_and_evaluate(config, tmp_path, progress=False)
    ckpts = checkpoint.Checkpoints(tmp_path)
    assert ckpts.latest_step() == 4
    params = _final_params(tmp_path, config)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
    assert not (tmp_path / "results.json").exists()


def test_kill_9_during_training_resumes_to_the_same_parameters(finished_run, tmp_path):
    """A real `kill -9` of `launch/main.py`, then the same command again."""
    config, workdir, _ = finished_run
    run = tmp_path / "run"
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"],
        "JAX_PLATFORMS": "cpu",
        "PETSR_ALLOCATOR": "system",  # no tcmalloc re-execution: not what this checks
        # The second command loads the programs the killed one compiled.
        **compilation_cache_env(tmp_path / "jax_cache"),
    }
    cmd = [
        sys.executable,
        str(REPO / "launch" / "main.py"),
        f"--config={REPO / 'configs' / 'srcnn.py'}:tiny,data.root={config.data.root},"
        "train.epochs=2",
        f"--workdir={run}",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "4").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    for a, b in zip(
        jax.tree.leaves(_final_params(workdir, config)),
        jax.tree.leaves(_final_params(run, config)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_a_paper_domain_run_trains_scores_and_loads_in_its_domain(nifti_root, tmp_path):
    import petsr_jax

    config = build_config("deepsr", f"tiny,paper,data.root={nifti_root},train.batch_size=4")
    assert (config.data.domain, config.data.flip, config.eval.weights) == ("paper", False, "final")
    results = train.train_and_evaluate(config, tmp_path, progress=False)
    assert (results["domain"], results["weights"], results["best_step"]) == (
        "paper",
        "final",
        results["step"],
    )
    test = results["test"]
    assert {"psnr", "ssim", "psnr_physical", "ssim_physical", "psnr_brain"} <= set(test["sr"])
    assert "scikit-image's default" in (tmp_path / "results.md").read_text()
    sr = petsr_jax.load(tmp_path)
    assert sr.domain == data.PAPER
    # Every slice is scaled to its own 8-bit range: a linear change of units cannot matter.
    volume = np.asarray(
        data.build_slice_set(nifti_root, ["pat-00"], eval_split=False).hr, np.float32
    )
    np.testing.assert_allclose(sr(volume * 1000.0), 1000.0 * sr(volume), rtol=1e-4, atol=1e-2)


def _events(folder):
    """Every event of the TFRecord files in `folder` (length, crc, payload, crc), oldest first."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.iterdir()):
        raw = path.read_bytes()
        while raw:
            (length,) = struct.unpack("<Q", raw[:8])
            events.append(event_pb2.Event.FromString(raw[12 : 12 + length]))
            raw = raw[12 + length + 4 :]
    return events


def test_a_resumed_writer_purges_the_events_logged_after_its_checkpoint(tmp_path):
    """Killed after step 7 with a checkpoint at 5: the resumed writer drops 6–7 from
    metrics.jsonl and opens its event file with TensorBoard's purge marker at step 6 (events of
    steps ≥ 6 in earlier files are dropped; step 5's stay, the resumed run does not redo it)."""
    import time

    from petsr_jax.train.logging import MetricWriter

    first = MetricWriter(tmp_path, 0)
    for step in range(8):
        first.write(step, {"train/loss": float(step)})
    first.close()
    time.sleep(1.1)  # event file names carry the second they were opened
    resumed = MetricWriter(tmp_path, 5)
    resumed.write(6, {"train/loss": 60.0})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4, 5, 6]
    assert lines[-1]["train/loss"] == 60.0  # step 6 logged again by the resumed run
    events = _events(tmp_path / "tensorboard")
    starts = [e for e in events if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in starts] == [(6, 1)]  # SessionLog.START
    assert events.index(starts[0]) > max(i for i, e in enumerate(events) if e.step == 7)
