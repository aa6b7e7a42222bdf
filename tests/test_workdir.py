"""Tests for petsr_jax.run (identity, lock, record): one run identity, one writer per folder,
progress for readers."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import fresh_python_env

import petsr_jax
from petsr_jax import train
from petsr_jax.config import build_config
from petsr_jax.run import identity, layout, lock

REPO = Path(__file__).resolve().parent.parent
# Launch scripts stay on the system allocator (no tcmalloc re-execution, a second interpreter
# start): the allocator is not what these tests check.
LAUNCH_ENV = {"PETSR_ALLOCATOR": "system"}


def _tiny(root, extra=""):
    return build_config("deepsr", f"tiny,data.root={root}{extra}")


@pytest.fixture
def finished_copy(tiny_deepsr_workdir, tmp_path):
    """A private copy of the session's finished tiny DeepSR run."""
    return Path(shutil.copytree(tiny_deepsr_workdir, tmp_path / "run"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != layout.LOCK
    }


# --------------------------------------------------------------------------- run identity


def test_a_rerun_with_another_lr_and_length_stops_and_leaves_the_workdir_as_it_was(
    finished_copy, nifti_root
):
    before = _snapshot(finished_copy)
    changed = _tiny(nifti_root, ",train.lr=3e-3,train.epochs=2")
    with pytest.raises(layout.WorkdirError) as error:
        train.train_and_evaluate(changed, finished_copy, progress=False)
    message = str(error.value)
    assert "train.epochs: 1 in the workdir, 2 now" in message
    assert "train.lr: 0.0001 in the workdir, 0.003 now" in message
    assert _snapshot(finished_copy) == before  # config.json byte-identical, nothing else touched
    assert not (finished_copy / layout.LOCK).exists()


def test_the_same_config_reports_the_finished_run_without_rewriting_it(finished_copy, nifti_root):
    before = _snapshot(finished_copy)
    # Logging cadence and loader workers change how a run computes, not what it learns.
    same = _tiny(nifti_root, ",train.log_every_steps=1,data.num_workers=0")
    results = train.train_and_evaluate(same, finished_copy, progress=False)
    assert results == json.loads(before["results.json"])
    assert _snapshot(finished_copy) == before


def test_other_evaluation_settings_score_the_trained_params_again(finished_copy, nifti_root):
    rescored = _tiny(nifti_root, ",eval.num_figure_slices=1")
    results = train.train_and_evaluate(rescored, finished_copy, progress=False)
    recorded = json.loads((finished_copy / "config.json").read_text())
    assert recorded["eval"]["num_figure_slices"] == 1
    assert results["step"] == json.loads((finished_copy / "results.json").read_text())["step"]


def test_default_workdirs_of_differing_configs_differ(finished_copy, nifti_root, tmp_path):
    runs = tmp_path / "runs"
    config = _tiny(nifti_root)
    readable = runs / identity.readable_name(config)
    assert identity.default_workdir(config, runs) == readable  # free: the readable name
    shutil.copytree(finished_copy, readable)
    assert identity.default_workdir(config, runs) == readable  # holds this very run
    other_lr = _tiny(nifti_root, ",train.lr=3e-3")
    other_seed = _tiny(nifti_root, ",seed=1")
    chatty = _tiny(nifti_root, ",train.log_every_steps=1")
    names = {identity.default_workdir(c, runs) for c in (config, other_lr, other_seed)}
    assert len(names) == 3
    assert identity.default_workdir(other_lr, runs).name.startswith(readable.name + "-")
    assert identity.default_workdir(chatty, runs) == readable
    assert identity.fingerprint(other_lr) == identity.fingerprint(
        _tiny(nifti_root, ",train.lr=0.003")
    )


def test_main_with_an_explicit_workdir_of_another_run_exits_2_naming_the_fields(
    finished_copy, nifti_root
):
    before = _snapshot(finished_copy)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/main.py"),
            f"--config={REPO}/configs/deepsr.py:tiny,data.root={nifti_root},train.lr=3e-3",
            f"--workdir={finished_copy}",
        ],
        env=fresh_python_env(**LAUNCH_ENV),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.lr: 0.0001 in the workdir, 0.003 now" in result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(finished_copy) == before


# --------------------------------------------------------------------------- one writer


def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path):
    with lock.WorkdirLock(tmp_path / "run"):
        with pytest.raises(layout.WorkdirError) as error:
            lock.WorkdirLock(tmp_path / "run").acquire()
    message = str(error.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert "being written by another training" in message
    assert not (tmp_path / "run" / layout.LOCK).exists()  # released on exit


def test_a_training_of_a_locked_workdir_touches_nothing(finished_copy, nifti_root):
    before = _snapshot(finished_copy)
    with lock.WorkdirLock(finished_copy):
        with pytest.raises(layout.WorkdirError, match="being written by another training"):
            train.train_and_evaluate(_tiny(nifti_root), finished_copy, progress=False)
        assert _snapshot(finished_copy) == before


HOLD_LOCK = """
import sys, time
from petsr_jax.run.lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _main(workdir: Path, root, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/main.py"),
            f"--config={REPO}/configs/deepsr.py:tiny,data.root={root}",
            f"--workdir={workdir}",
        ],
        env=fresh_python_env(PETSR_CACHE_DIR=str(cache), **LAUNCH_ENV),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_second_process_stops_before_any_work_and_a_killed_holder_is_not_waited_for(
    finished_copy, nifti_root, tmp_path
):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(finished_copy)],
        stdout=subprocess.PIPE,
        text=True,
        env=fresh_python_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(finished_copy)
        cache = tmp_path / "cache"
        refused = _main(finished_copy, nifti_root, cache)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"pid {holder.pid} on {socket.gethostname()}" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert _snapshot(finished_copy) == before  # the workdir unchanged by the second process
        assert not cache.exists() or not any(cache.iterdir())  # stopped before reading data
    finally:
        holder.kill()  # kill -9: the lock file stays behind
        holder.wait()
    assert (finished_copy / layout.LOCK).exists()
    rerun = _main(finished_copy, nifti_root, tmp_path / "cache2")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"process {holder.pid} is not running" in rerun.stderr
    assert not (finished_copy / layout.LOCK).exists()


def _write_lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / layout.LOCK
    path.write_text(json.dumps({"token": "old", "started": time.time(), **holder}))
    return path


def test_the_lock_of_a_dead_process_on_this_host_is_broken(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid)
    with lock.WorkdirLock(tmp_path) as taken:
        held = json.loads((tmp_path / layout.LOCK).read_text())
        assert held["token"] == taken.token and held["pid"] == os.getpid()
    assert f"process {dead.pid} is not running" in caplog.text


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), process_start="0")
    with lock.WorkdirLock(tmp_path):
        pass


def test_another_hosts_lock_is_respected_until_its_heartbeat_is_stale(tmp_path):
    path = _write_lock(tmp_path, host="node-17.cluster", pid=4242)
    with pytest.raises(layout.WorkdirError, match="pid 4242 on node-17.cluster"):
        lock.WorkdirLock(tmp_path).acquire()
    old = time.time() - lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    with lock.WorkdirLock(tmp_path):
        pass


def test_the_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    with lock.WorkdirLock(tmp_path):
        path = tmp_path / layout.LOCK
        old = time.time() - 3600
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 60


# --------------------------------------------------------------------------- records and readers


def test_a_run_records_its_length_command_versions_and_devices(tiny_deepsr_workdir):
    record = json.loads((tiny_deepsr_workdir / layout.RUN_RECORD).read_text())
    assert record["total_steps"] >= 1 and record["steps_per_epoch"] >= 1
    assert record["versions"]["jax"] and record["versions"]["flax"]
    assert record["devices"]["platform"] == "cpu" and record["devices"]["count"] == 4
    assert isinstance(record["command"], list)


def test_loading_an_unfinished_run_says_how_far_it_got(finished_copy):
    (finished_copy / "results.json").unlink()
    record = json.loads((finished_copy / layout.RUN_RECORD).read_text())
    record["total_steps"] = 99
    (finished_copy / layout.RUN_RECORD).write_text(json.dumps(record))
    step = layout.latest_step(finished_copy)
    with pytest.warns(UserWarning, match=rf"trained {step} of 99 steps; using the \w+ checkpoint"):
        petsr_jax.load(finished_copy)


def test_loading_a_finished_run_warns_of_nothing(tiny_deepsr_workdir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        petsr_jax.load(tiny_deepsr_workdir)
