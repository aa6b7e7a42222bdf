"""Multi-process training on JAX's distributed runtime, on one machine.

Two `launch/main.py` processes on localhost, each with 2 fake CPU devices and Gloo collectives,
train the tiny config and must end where one process with 4 devices ends (same global batch);
a run whose process is killed after a checkpoint resumes, when both processes are started
again, to the parameters of an uninterrupted two-process run. Faster checks cover how
`petsr_jax.distributed` reads the config and the environment, and that the processes' batches,
crops and flips included, together make the single-process batch.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compilation_cache_env

from petsr_jax import data, distributed, train
from petsr_jax.config import build_config
from petsr_jax.models import create_model
from petsr_jax.run import checkpoint, layout

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 2
DEVICES_PER_PROCESS = 2
EPOCHS = 2  # 2 train patients x 8 slices / batch 4 = 4 steps per epoch, checkpoints at 4 and 8
# Two processes sum the gradient over their devices through Gloo, one process inside XLA: the
# same numbers added in another order, so float32 rounding differs in the last bits and grows a
# little over the steps. Anything else (a different batch, crop or flip) moves the parameters
# by ~1e-2 after 8 steps.
RTOL, ATOL = 1e-5, 1e-6
RUN_TIMEOUT_S = 300


# ------------------------------------------------------------------- config and environment


def _distributed_config(**fields):
    arg = ",".join(f"distributed.{k}={v}" for k, v in fields.items())
    return build_config("srcnn", arg)


def test_distributed_is_off_without_a_request_or_a_job_step():
    assert distributed.initialize_kwargs(_distributed_config(), environ={}) is None
    assert distributed.initialize_kwargs(_distributed_config(mode="off"), environ={}) is None
    # One python inside an sbatch allocation of 8 tasks is one process, not a job step of 8.
    sbatch = {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0"}
    assert distributed.initialize_kwargs(_distributed_config(), environ=sbatch) is None
    srun_one = {**sbatch, "SLURM_STEP_NUM_TASKS": "1"}
    assert distributed.initialize_kwargs(_distributed_config(), environ=srun_one) is None


def test_distributed_job_steps_leave_the_arguments_to_jax():
    srun = {"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}
    assert distributed.initialize_kwargs(_distributed_config(), environ=srun) == {}
    assert distributed.initialize_kwargs(_distributed_config(), {"OMPI_COMM_WORLD_SIZE": "4"}) == {}
    # Explicit fields still win over what JAX would detect.
    config = _distributed_config(num_processes=8, process_id=3)
    assert distributed.initialize_kwargs(config, environ=srun) == {
        "num_processes": 8,
        "process_id": 3,
    }


def test_distributed_explicit_launch_needs_every_field():
    config = _distributed_config(coordinator_address="host0:1234", num_processes=2, process_id=1)
    assert distributed.initialize_kwargs(config, environ={}) == {
        "coordinator_address": "host0:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    with pytest.raises(distributed.DistributedError, match="distributed.process_id"):
        distributed.initialize_kwargs(
            _distributed_config(coordinator_address="host0:1234", num_processes=2), environ={}
        )
    with pytest.raises(distributed.DistributedError, match="coordinator_address.*num_processes"):
        distributed.initialize_kwargs(_distributed_config(mode="on"), environ={})
    with pytest.raises(distributed.DistributedError, match="process_id: 2 is not below"):
        distributed.initialize_kwargs(
            _distributed_config(coordinator_address="h:1", num_processes=2, process_id=2), {}
        )
    # JAX reads the coordinator from its own variable; the count and id must still be given.
    env = {"JAX_COORDINATOR_ADDRESS": "host0:1234"}
    with pytest.raises(distributed.DistributedError, match="num_processes"):
        distributed.initialize_kwargs(_distributed_config(), environ=env)
    config = _distributed_config(num_processes=2, process_id=0)
    assert distributed.initialize_kwargs(config, environ=env) == {
        "num_processes": 2,
        "process_id": 0,
    }


def test_distributed_launch_missing_fields_is_one_line_from_main(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "main.py"),
            f"--config={REPO / 'configs' / 'srcnn.py'}:tiny",
            "--config.distributed.coordinator_address=localhost:1",
            f"--workdir={tmp_path / 'run'}",
        ],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PETSR_ALLOCATOR": "system"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("main.py: error: several processes were asked for")
    )
    assert "distributed.num_processes, distributed.process_id" in done.stderr
    assert not (tmp_path / "run").exists()


def test_distributed_refuses_to_start_after_jax_has():
    jax.devices()  # the backend is up, as it is after any computation; JAX itself refuses then
    config = _distributed_config(coordinator_address="localhost:1", num_processes=2, process_id=0)
    with pytest.raises(distributed.DistributedError, match="before JAX's backend"):
        distributed.initialize(config)


def test_distributed_process_batches_are_blocks_of_the_single_process_batch():
    rng = np.random.default_rng(0)
    slices = rng.uniform(size=(13, 12, 12)).astype(np.float32)
    src = data.SliceSource(array=slices)
    kwargs = dict(batch_size=4, seed=5, crop_size=8, flip=True)

    def batches(ds, n):
        it = data.train_iterator(ds)
        return [next(it)["hr"] for _ in range(n)]

    steps = 7  # past the first epoch (13 slices = 3 batches), into the reshuffled second
    single = batches(data.train_dataset(src, **kwargs), steps)
    for count in (2, 4):
        parts = [
            batches(data.train_dataset(src, **kwargs, process_index=p, process_count=count), steps)
            for p in range(count)
        ]
        for t in range(steps):
            np.testing.assert_array_equal(np.concatenate([part[t] for part in parts]), single[t])


# -------------------------------------------------------------------- two processes on localhost


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(cache_dir: Path) -> dict:
    flags = os.environ.get("XLA_FLAGS", "")
    count = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", count, flags)
    if count not in flags:
        flags = f"{flags} {count}"
    return {
        **os.environ,
        "XLA_FLAGS": flags.strip(),
        "JAX_PLATFORMS": "cpu",
        # No tcmalloc re-execution (a second interpreter start): not what these tests check.
        "PETSR_ALLOCATOR": "system",
        "PETSR_CACHE_DIR": str(cache_dir),
        # Later launches load the programs earlier ones compiled (the same executables, so the
        # same numbers): several seconds less per process on a 2-core machine.
        **compilation_cache_env(cache_dir.parent / "jax_compilation_cache"),
    }


def _launch(
    root: Path, workdir: Path, cache_dir: Path, tag: str = "run"
) -> list[tuple[subprocess.Popen, Path]]:
    """Start the processes of one multi-process run; each logs to `<workdir>.<tag>.<id>.log`."""
    port = _free_port()
    procs = []
    for process_id in range(PROCESSES):
        log = workdir.parent / f"{workdir.name}.{tag}.{process_id}.log"
        cmd = [
            sys.executable,
            str(REPO / "launch" / "main.py"),
            f"--config={REPO / 'configs' / 'srcnn.py'}:tiny,data.root={root},train.epochs={EPOCHS}",
            f"--config.distributed.coordinator_address=localhost:{port}",
            f"--config.distributed.num_processes={PROCESSES}",
            f"--config.distributed.process_id={process_id}",
            f"--workdir={workdir}",
            "--verbosity=0",  # INFO logs into the log files: "resumed from step ..."
        ]
        with open(log, "wb") as out:
            procs.append((subprocess.Popen(cmd, env=_env(cache_dir), stdout=out, stderr=out), log))
    return procs


def _tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    useful = [line for line in text if not line.startswith(("I1", "I0", "W1", "W0", "[Gloo]"))]
    return "\n".join(useful[-lines:])


def _kill(procs) -> None:
    # SIGKILL: JAX's distributed runtime catches SIGTERM as a preemption notice.
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def _wait(procs, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    try:
        for proc, log in procs:
            proc.wait(timeout=max(deadline - time.time(), 1))
            assert proc.returncode == 0, f"process exited with {proc.returncode}:\n{_tail(log)}"
    finally:
        _kill(procs)


def _last_params(workdir: Path):
    config = build_config("srcnn", "tiny")
    model = create_model(config)
    like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    return jax.device_get(checkpoint.restore_params(workdir, like, which="last"))


@pytest.fixture(scope="module")
def runs(nifti_root, tiny_srcnn_workdir, tmp_path_factory):
    """The one-process 4-device run of conftest (trained in this process) and a two-process
    run of the same config."""
    assert jax.device_count() == PROCESSES * DEVICES_PER_PROCESS
    config = json.loads((tiny_srcnn_workdir / "config.json").read_text())
    assert (config["model"]["name"], config["train"]["epochs"]) == ("srcnn", EPOCHS)
    assert config["data"]["root"] == str(nifti_root)
    base = tmp_path_factory.mktemp("distributed")
    cache_dir = tmp_path_factory.getbasetemp() / "slice_cache"
    single = tiny_srcnn_workdir
    multi = base / "multi"
    procs = _launch(nifti_root, multi, cache_dir)
    _wait(procs)
    return {
        "single": single,
        "multi": multi,
        "logs": [log for _, log in procs],
        "base": base,
        "root": nifti_root,
    }


def test_distributed_two_processes_end_with_the_single_process_params(runs):
    single, multi = _last_params(runs["single"]), _last_params(runs["multi"])
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    r1, r2 = (json.loads((runs[k] / "results.json").read_text()) for k in ("single", "multi"))
    assert r1["step"] == r2["step"] == 4 * EPOCHS
    assert r1["best_step"] == r2["best_step"]
    for image in ("bicubic", "sr"):
        for metric in ("psnr", "ssim"):
            assert r2["test"][image][metric] == pytest.approx(r1["test"][image][metric], rel=1e-4)


def test_distributed_outputs_are_written_once_by_process_zero(runs):
    multi = runs["multi"]
    for name in ("results.json", "results.md", "test_slices.png", "test_scores.json"):
        assert (multi / name).is_file(), name
    assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 1
    steps = [
        json.loads(line)["step"]
        for line in (multi / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == sorted(set(steps)), "each step's training metrics logged once"
    process0, process1 = (log.read_text(errors="replace") for log in runs["logs"])
    assert "| Output SR (multi-scale SRCNN) |" in process0
    assert "| Output SR" not in process1
    assert not list(multi.glob(".*.tmp")), "no temporary files left behind"


def test_distributed_checkpoint_resumes_in_one_process(runs, tmp_path):
    """The two-process run's step-4 checkpoint, resumed by one 4-device process (this one)."""
    workdir = Path(shutil.copytree(runs["multi"], tmp_path / "resumed"))
    shutil.rmtree(workdir / "checkpoints" / "8")
    shutil.rmtree(workdir / "best")  # its step would be saved again on the way to step 8
    for name in layout.RUN_OUTPUTS:
        (workdir / name).unlink()
    assert checkpoint.Checkpoints(workdir).latest_step() == 4
    config = build_config("srcnn", f"tiny,data.root={runs['root']},train.epochs={EPOCHS}")
    train.train_and_evaluate(config, workdir, progress=False)
    for a, b in zip(
        jax.tree.leaves(_last_params(runs["single"])),
        jax.tree.leaves(_last_params(workdir)),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_distributed_resume_after_a_killed_process(runs, nifti_root, tmp_path_factory):
    """Kill one process once step 4 is saved; rerunning both ends with the uninterrupted params."""
    cache_dir = tmp_path_factory.getbasetemp() / "slice_cache"
    workdir = runs["base"] / "killed"
    procs = _launch(nifti_root, workdir, cache_dir)
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        while not (workdir / "checkpoints" / "4").is_dir():
            assert time.time() < deadline, _tail(procs[0][1])
            assert all(p.poll() is None for p, _ in procs), _tail(procs[0][1])
            time.sleep(0.01)
        procs[1][0].send_signal(signal.SIGKILL)
        procs[1][0].wait()
        # Process 0 now waits for its peer at the next collective or checkpoint barrier until
        # the runtime's heartbeat timeout (100 s); a scheduler ends the whole job step instead.
        try:
            procs[0][0].wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
    finally:
        _kill(procs)
    assert not (workdir / "results.json").exists()
    latest = checkpoint.Checkpoints(workdir).latest_step()
    assert latest in (4, 8)  # 8 only if both processes committed it before the kill

    rerun = _launch(nifti_root, workdir, cache_dir, tag="rerun")
    _wait(rerun)
    assert f"resumed from step {latest}" in rerun[0][1].read_text(errors="replace")
    for a, b in zip(
        jax.tree.leaves(_last_params(runs["multi"])),
        jax.tree.leaves(_last_params(workdir)),
        strict=True,
    ):
        np.testing.assert_array_equal(b, a)
