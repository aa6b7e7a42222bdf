"""Faults and bad inputs: each is caught early with a message that names the file, patient or
field, or leaves a run that a rerun of the same command completes.

- `kill -9` while a checkpoint is being committed: the rerun resumes from the previous step and
  ends with the parameters of an uninterrupted run.
- NaN / Inf in a patient's NIfTI volume or produced by a DICOM RescaleSlope: stopped at loading.
- An unwritable, full or nearly full workdir: stopped before training.
- A truncated checkpoint file, a damaged checkpoint metadata file or a checkpoint of another
  model: `CheckpointError` saying what to do; a workdir of another config: `WorkdirError`.
- No pickle anywhere data or checkpoints are loaded.
- Every output (results, figure, NIfTI, DICOM series) written whole or not at all.
"""

import ast
import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pydicom
import pytest

from petsr_jax import data, io, train
from petsr_jax.config import build_config
from petsr_jax.evaluation import report
from petsr_jax.io import files
from petsr_jax.models import create_model
from petsr_jax.run import checkpoint, layout
from petsr_jax.volume import Volume

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "petsr_jax"
EPOCHS = 2  # 4 steps per epoch on the tiny nifti root: checkpoints at 4 and 8


def _config(root, model="srcnn", **overrides):
    arg = f"tiny,data.root={root},train.epochs={EPOCHS}"
    arg += "".join(f",{k}={v}" for k, v in overrides.items())
    return build_config(model, arg)


def _params_like(model="srcnn"):
    config = build_config(model, "tiny")
    return create_model(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]


def _last_params(workdir):
    return jax.device_get(checkpoint.restore_params(workdir, _params_like(), which="last"))


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _temporaries(folder: Path) -> list[Path]:
    """Leftovers of the atomic writers: `.<name>.<random>.tmp[...]` files and folders."""
    return [p for p in Path(folder).rglob(".*") if ".tmp" in p.name]


@contextlib.contextmanager
def _no_pickle():
    """Fail on any unpickling, and on `np.load` asked to allow pickles, while inside."""

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading data or checkpoints")

    real_np_load = np.load

    def np_load_without_pickle(*args, allow_pickle=False, **kwargs):
        assert allow_pickle is False, "np.load called with allow_pickle=True"
        return real_np_load(*args, allow_pickle=False, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickle, "loads", refuse)
        mp.setattr(pickle, "load", refuse)
        mp.setattr(np, "load", np_load_without_pickle)
        yield


@pytest.fixture(scope="module")
def finished(nifti_root, tmp_path_factory):
    """An uninterrupted tiny run, trained and evaluated with unpickling forbidden."""
    workdir = tmp_path_factory.mktemp("hardening") / "finished"
    with pytest.MonkeyPatch.context() as mp, _no_pickle():
        mp.setenv("PETSR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "slice_cache"))
        results = train.train_and_evaluate(_config(nifti_root), workdir, progress=False)
    return workdir, results


# --------------------------------------------------------------------------- kill -9 mid-save

# Runs launch/main.py with the final rename of checkpoint step $SLOW_COMMIT_STEP held back: the
# step's files are all written into `<step>.orbax-checkpoint-tmp`, the marker file says so, and
# the process sleeps where Orbax would commit the step, so a kill lands inside the save.
_SLOW_COMMIT = """
import os, pathlib, runpy, sys, time
marker = pathlib.Path(os.environ["SLOW_COMMIT_MARKER"])
step = os.environ["SLOW_COMMIT_STEP"]
real_rename = os.rename
def held_rename(src, dst, *args, **kwargs):
    source, target = pathlib.Path(os.fsdecode(src)), pathlib.Path(os.fsdecode(dst))
    if source.parent.name == "checkpoints" and target.name == step:
        marker.write_text(str(target))
        time.sleep(600)
    return real_rename(src, dst, *args, **kwargs)
os.rename = held_rename
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _with_compilation_cache(folder: Path) -> dict:
    """The environment, plus JAX's persistent compilation cache in `folder`.

    The rerun loads the killed run's compiled train step instead of compiling it again (the
    same executable, so the same numbers): several seconds less on a 2-core machine.
    """
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(folder),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def test_kill_9_while_a_checkpoint_is_written_leaves_a_resumable_run(
    finished, nifti_root, tmp_path
):
    reference, _ = finished
    workdir, marker = tmp_path / "run", tmp_path / "committing"
    # Checkpoints every 2 steps, so step 2 is committed when step 4's commit is cut; no
    # validation before the end (it does not change the last params) keeps the runs short.
    arg = (
        f"tiny,data.root={nifti_root},train.epochs={EPOCHS},train.checkpoint_every_steps=2,"
        f"train.eval_every_steps={4 * EPOCHS}"
    )
    main = [str(REPO / "launch" / "main.py"), f"--config={REPO / 'configs' / 'srcnn.py'}:{arg}"]
    main.append(f"--workdir={workdir}")
    env = {
        **_with_compilation_cache(tmp_path / "jax_cache"),
        "SLOW_COMMIT_MARKER": str(marker),
        "SLOW_COMMIT_STEP": "4",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_COMMIT, *main],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "checkpoint step 4 never started its commit"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert (workdir / "checkpoints" / "4.orbax-checkpoint-tmp" / "state").is_dir()
    assert checkpoint.Checkpoints(workdir).latest_step() == 2
    assert not (workdir / "results.json").exists()

    rerun = subprocess.run(
        [sys.executable, *main, "--verbosity=0"],  # INFO: the "resumed from" line
        env=_with_compilation_cache(tmp_path / "jax_cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step 2" in rerun.stderr
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp"))
    _assert_same_params(_last_params(reference), _last_params(workdir))


# ------------------------------------------------------------------------------ NaN / Inf input


def _copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_nan_and_inf_in_a_nifti_patient_stop_the_run_before_training(nifti_root, tmp_path):
    root = _copy_root(nifti_root, tmp_path / "root")
    path = root / "pat-01.nii.gz"
    image = nib.load(str(path))
    voxels = np.asanyarray(image.dataobj).copy()  # NIfTI axes (x, y, slice)
    voxels[5, 5, 3], voxels[1, 1, 6] = np.nan, np.inf
    nib.save(nib.Nifti1Image(voxels, image.affine, image.header), str(path))
    workdir = tmp_path / "run"
    with pytest.raises(
        io.ScanError, match=r"pat-01\.nii\.gz: 2 voxels are NaN or infinite, in slices 3, 6"
    ):
        train.train_and_evaluate(_config(root, **{"data.split": "4/0/0"}), workdir)
    assert not (workdir / "checkpoints").exists()


def test_an_infinite_dicom_rescale_names_the_patient_slices_and_files(tmp_path):
    from conftest import blob_volume

    volume, _ = blob_volume(2)
    files = io.write_dicom(
        Volume(volume, (2.0, 2.0, 2.0), units="BQML", patient_id="pat-d"), tmp_path / "pat-d"
    )
    # A slope no float can hold times the stored values: NaN cannot be stored in DICOM pixels,
    # but an Inf arrives through the rescale.
    for k in (4, 6):
        header = pydicom.dcmread(files[k])
        header.RescaleSlope = "1e308"
        header.save_as(files[k])
    with pytest.warns(RuntimeWarning, match="overflow"):
        with pytest.raises(data.DataError) as error:
            data.load_patient(tmp_path, "pat-d", tmp_path / "pat-d")
    message = str(error.value)
    assert "patient pat-d" in message
    assert "slice 4 (slice_0005.dcm), slice 6 (slice_0007.dcm)" in message


# --------------------------------------------------------------------------------- the workdir


def _mount_tmpfs(path: Path, options: str):
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small or read-only file system")
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr}")


@pytest.fixture
def tmpfs(tmp_path):
    """`mount(options) -> folder` on a fresh tmpfs; unmounted after the test."""
    mounted = []

    def mount(options: str) -> Path:
        folder = tmp_path / f"mnt{len(mounted)}"
        _mount_tmpfs(folder, options)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fails_before_training(config, workdir, match, error=OSError):
    with pytest.raises(error, match=match):
        train.train_and_evaluate(config, workdir, progress=False)
    assert not (workdir / "checkpoints").exists()
    assert not (workdir / "metrics.jsonl").exists()


def test_a_workdir_below_a_file_or_that_is_a_file_is_refused(nifti_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = _config(nifti_root)
    _fails_before_training(
        config, blocker / "run", r"workdir .*a_file/run is not writable: Not a directory"
    )
    _fails_before_training(config, blocker, r"workdir .*a_file is a file, not a folder")


def test_a_read_only_workdir_is_refused_even_for_root(nifti_root, tmpfs):
    mount = tmpfs("ro,size=1m")
    _fails_before_training(
        _config(nifti_root), mount / "run", r"is not writable: Read-only file system"
    )


def test_a_full_disk_is_refused_before_training(nifti_root, tmpfs):
    mount = tmpfs("size=64k")
    (mount / "run").mkdir()
    with contextlib.suppress(OSError), open(mount / "filler", "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    _fails_before_training(
        _config(nifti_root), mount / "run", r"is not writable: No space left on device"
    )
    assert list((mount / "run").iterdir()) == [], "the write probe is removed"


def test_a_nearly_full_disk_is_refused_before_training(nifti_root, tmpfs):
    mount = tmpfs("size=4m")
    _fails_before_training(
        _config(nifti_root), mount / "run", r"has 4\.0 MiB free; .* need about \d+\.\d MiB"
    )


def test_free_space_is_checked_against_the_checkpoints(nifti_root, tmp_path, monkeypatch):
    """The same check without a mount: the disk reports 1 MiB free."""
    real = shutil.disk_usage

    def almost_full(path):
        usage = real(path)
        return usage._replace(free=2**20)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", almost_full)
    _fails_before_training(
        _config(nifti_root), tmp_path / "run", r"has 1\.0 MiB free; .* need about \d+\.\d MiB"
    )


# ------------------------------------------------------------------------------- checkpoints


def _resumable_copy(finished_dir: Path, dst: Path) -> Path:
    shutil.copytree(finished_dir, dst)
    (dst / "results.json").unlink()  # not finished: a rerun restores the last checkpoint
    return dst


def test_a_truncated_checkpoint_file_is_reported_with_the_step_to_fall_back_to(
    finished, nifti_root, tmp_path
):
    workdir = _resumable_copy(finished[0], tmp_path / "run")
    data_files = [p for p in (workdir / "checkpoints" / "8" / "state").rglob("*") if p.is_file()]
    largest = max(data_files, key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)
    with pytest.raises(checkpoint.CheckpointError) as error:
        train.train_and_evaluate(_config(nifti_root), workdir, progress=False)
    message = str(error.value)
    assert f"checkpoint {workdir / 'checkpoints' / '8'} cannot be read" in message
    assert f"Delete {workdir / 'checkpoints' / '8'} to resume from step 4" in message
    # Doing what it says works.
    shutil.rmtree(workdir / "checkpoints" / "8")
    assert checkpoint.Checkpoints(workdir).latest_step() == 4


def test_a_damaged_checkpoint_metadata_file_is_reported(finished, tmp_path):
    workdir = _resumable_copy(finished[0], tmp_path / "run")
    best_step = checkpoint.Checkpoints(workdir).best_step()
    (workdir / "best" / str(best_step) / "params" / "_METADATA").write_text("{not json")
    # The latest full state is read instead, with a warning naming both.
    with pytest.warns(UserWarning, match=r"best/\d+ cannot be read; its files .* Using the lat"):
        params = checkpoint.restore_params(workdir, _params_like(), which="best")
    _assert_same_params(params, _last_params(workdir))
    shutil.rmtree(workdir / "checkpoints")  # nothing to fall back to: the damage is the error
    with pytest.raises(checkpoint.CheckpointError, match=r"best/\d+ cannot be read; its files"):
        checkpoint.restore_params(workdir, _params_like(), which="best")


@pytest.fixture(scope="module")
def deepsr_checkpoint(tmp_path_factory, nifti_root):
    """A workdir holding a DeepSR checkpoint (an initial state: restore only reads its tree)."""
    workdir = tmp_path_factory.mktemp("deepsr") / "workdir"
    config = _config(nifti_root, model="deepsr")
    model, tx = create_model(config), train.make_optimizer(config)
    # Shapes without running the network: zeros of the right tree are a real DeepSR checkpoint.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )
    ckpts = checkpoint.Checkpoints(workdir)
    ckpts.save(4, state, {"next_index": 4})
    ckpts.save_best(4, state.params, 20.0)
    ckpts.wait()
    ckpts.close()
    files.write_json_atomic(workdir / "config.json", json.loads(config.to_json()))
    return workdir


@pytest.fixture
def deepsr_workdir(deepsr_checkpoint, tmp_path):
    return Path(shutil.copytree(deepsr_checkpoint, tmp_path / "deepsr"))


def test_a_workdir_of_another_model_is_refused_by_its_recorded_config(deepsr_workdir, nifti_root):
    with pytest.raises(
        layout.WorkdirError,
        match=r"another config \(model\.name: 'deepsr' in the workdir, 'srcnn' now",
    ):
        train.train_and_evaluate(_config(nifti_root), deepsr_workdir, progress=False)
    assert json.loads((deepsr_workdir / "config.json").read_text())["model"]["name"] == "deepsr"


def test_a_checkpoint_of_another_model_names_the_arrays_that_differ(deepsr_workdir, nifti_root):
    (deepsr_workdir / "config.json").unlink()  # no record: the checkpoint's own tree tells
    with pytest.raises(checkpoint.CheckpointError) as error:
        train.train_and_evaluate(_config(nifti_root), deepsr_workdir, progress=False)
    message = str(error.value)
    assert "was written by a different model or config" in message
    assert "6 arrays of this model missing from the checkpoint (nonlinear_mapping/bias" in message
    assert "arrays in the checkpoint that this model lacks (block_0/conv1/bias" in message
    for which in ("best", "last"):
        with pytest.raises(checkpoint.CheckpointError, match="different model or config"):
            checkpoint.restore_params(deepsr_workdir, _params_like("srcnn"), which=which)


def test_restoring_from_a_folder_without_checkpoints_says_so_and_creates_nothing(tmp_path):
    folder = tmp_path / "not_a_workdir"
    folder.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint .*training run"):
        checkpoint.restore_params(folder, _params_like())
    assert list(folder.iterdir()) == []


def test_params_restore_onto_one_device_whatever_devices_saved_them(finished):
    """Saved from 4 devices, restored from host arrays: no device layout carried over."""
    workdir, _ = finished
    host_like = jax.tree.map(np.asarray, _params_like())
    for which in ("best", "last"):
        params = checkpoint.restore_params(workdir, host_like, which=which)
        for leaf in jax.tree.leaves(params):
            assert leaf.sharding.device_set == {jax.local_devices()[0]}


# ------------------------------------------------------------------------------------ pickle


def test_no_pickle_when_loading_slices_or_checkpoints(finished, nifti_root, tmp_path_factory):
    """The finished run trained and evaluated under `_no_pickle`; now read back under it too."""
    workdir, _ = finished
    split = json.loads((workdir / "split.json").read_text())
    with pytest.MonkeyPatch.context() as mp, _no_pickle():
        mp.setenv("PETSR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "slice_cache"))
        cached = data.build_slice_set(Path(nifti_root), split["train"], eval_split=False)
        assert isinstance(cached.hr, np.memmap)  # came from the .npy cache
        for which in ("best", "last"):
            checkpoint.restore_params(workdir, _params_like(), which=which)


def test_every_np_load_in_the_package_refuses_pickles():
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cPickle", "dill", "cloudpickle"} & set(names), path
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "load" and ast.unparse(func) in ("np.load", "numpy.load"):
                keywords = {k.arg: k.value for k in node.keywords}
                allow = keywords.get("allow_pickle")
                assert isinstance(allow, ast.Constant) and allow.value is False, (
                    f"{path.name}:{node.lineno}: np.load without allow_pickle=False"
                )
                calls.append(f"{path.name}:{node.lineno}")
    assert calls, "the slice cache is read with np.load; the scan found none"


# ----------------------------------------------------------------------------- atomic outputs


class _Interrupted(Exception):
    pass


def test_an_interrupted_result_or_figure_write_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text('{"old": true}\n')

    def crash(fd):  # the bytes are in the temporary file; the rename has not happened
        raise _Interrupted

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(_Interrupted):
        files.write_json_atomic(tmp_path / "results.json", {"new": True})
    with pytest.raises(_Interrupted):
        files.write_atomic(tmp_path / "results.md", b"# results\n" * 1000)
    hr = np.random.default_rng(0).uniform(size=(2, 16, 16)).astype(np.float32)
    with pytest.raises(_Interrupted):
        report.comparison_figure(tmp_path / "test_slices.png", hr, hr, hr)
    assert json.loads((tmp_path / "results.json").read_text()) == {"old": True}
    assert not (tmp_path / "results.md").exists()
    assert not (tmp_path / "test_slices.png").exists()
    assert not _temporaries(tmp_path)


def test_an_interrupted_nifti_or_dicom_write_leaves_nothing(tmp_path, monkeypatch):
    from conftest import blob_volume

    volume = Volume(blob_volume(0)[0], (2.0, 2.0, 2.0), units="BQML", patient_id="p")
    real_save = nib.save

    def half_save(image, filename):  # a partial file under the temporary name, then the crash
        real_save(image, filename)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise _Interrupted

    monkeypatch.setattr(nib, "save", half_save)
    with pytest.raises(_Interrupted):
        io.write_nifti(volume, tmp_path / "sr.nii.gz")
    monkeypatch.undo()

    real_save_as = pydicom.dataset.Dataset.save_as
    written = []

    def third_slice_fails(self, *args, **kwargs):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(1)
        return real_save_as(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", third_slice_fails)
    with pytest.raises(io.ScanError, match="cannot write the series .*nothing written"):
        io.write_dicom(volume, tmp_path / "sr_dicom")
    assert len(written) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _blob_volume() -> Volume:
    from conftest import blob_volume

    return Volume(blob_volume(0)[0], (2.0, 2.0, 2.0), units="BQML", patient_id="p")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_two_formats_are_written_all_or_nothing_and_the_rerun_is_not_blocked(tmp_path, monkeypatch):
    volume = _blob_volume()
    targets = {"dicom_dir": tmp_path / "p", "nifti_path": tmp_path / "p.nii.gz"}
    monkeypatch.setattr(nib, "save", _no_space)  # the DICOM series is complete by then
    with pytest.raises(
        io.ScanError,
        match=r"p\.nii\.gz: cannot write the file \(No space left on device\); nothing written",
    ):
        io.write_outputs(volume, **targets)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    real_replace = os.replace

    def nifti_rename_fails(source, target):  # after the DICOM series got its name
        if str(target).endswith(".nii.gz"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", nifti_rename_fails)
    with pytest.raises(io.ScanError, match=r"p\.nii\.gz: cannot write the file \(Invalid cross"):
        io.write_outputs(volume, **targets)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    assert io.write_outputs(volume, **targets) == [targets["dicom_dir"], targets["nifti_path"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "p.nii.gz"]
    np.testing.assert_allclose(io.read_volume(tmp_path / "p.nii.gz").data, volume.data)
    assert io.read_volume(tmp_path / "p").shape == volume.shape


def test_a_failing_clean_up_never_hides_the_write_error(tmp_path, monkeypatch):
    volume = _blob_volume()

    def cannot_remove(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", _no_space)
    monkeypatch.setattr(nib, "save", _no_space)
    monkeypatch.setattr(shutil, "rmtree", cannot_remove)
    monkeypatch.setattr(Path, "unlink", cannot_remove)
    with pytest.raises(io.ScanError, match=r"cannot write the series \(No space left on device\)"):
        io.write_dicom(volume, tmp_path / "p")
    with pytest.raises(io.ScanError, match=r"cannot write the file \(No space left on device\)"):
        io.write_nifti(volume, tmp_path / "p.nii.gz")


_KILLED_WHILE_SAVING_NIFTI = """
import sys, time
import nibabel as nib
import numpy as np
from petsr_jax import io
from petsr_jax.volume import Volume

def stalled_save(image, filename):  # the 0-byte file a killed save leaves, then a long wait
    open(filename, "wb").close()
    print("saving", flush=True)
    time.sleep(120)

nib.save = stalled_save
volume = Volume(np.ones((6, 16, 16), np.float32), (2.0, 2.0, 2.0), units="BQML", patient_id="p")
io.write_outputs(volume, dicom_dir=sys.argv[1] + "/p", nifti_path=sys.argv[1] + "/p.nii.gz")
"""


def test_kill_9_while_writing_two_formats_leaves_only_leftovers_the_rerun_removes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WHILE_SAVING_NIFTI, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        assert proc.stdout.readline().strip() == "saving"  # the DICOM series is complete
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert not (out / "p").exists() and not (out / "p.nii.gz").exists()
    leftovers = _temporaries(out)
    assert len(leftovers) == 2 and all(p.name.startswith(".p.") for p in leftovers)
    with pytest.warns(UserWarning, match="skipped 2 leftover"):
        assert io.list_series(out) == []  # not a second PET series beside a later one

    volume = _blob_volume()
    with pytest.warns(UserWarning, match="removed 2 leftover"):
        io.write_outputs(volume, dicom_dir=out / "p", nifti_path=out / "p.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["p", "p.nii.gz"]
    with pytest.warns(
        UserWarning, match=r"ignored 1 file\(s\) that are not DICOM images: p\.nii\.gz"
    ):
        assert [info.n_files for info in io.list_series(out)] == [volume.shape[0]]


def test_a_run_interrupted_while_writing_its_outputs_rewrites_them_on_rerun(
    finished, nifti_root, tmp_path, monkeypatch
):
    reference, results = finished
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for name in layout.RUN_OUTPUTS:
        (workdir / name).unlink()
    real_write = files.write_atomic

    def crash_on_markdown(path, payload):
        if Path(path).name == "results.md":
            raise _Interrupted
        return real_write(path, payload)

    monkeypatch.setattr(report, "write_atomic", crash_on_markdown)
    with pytest.raises(_Interrupted):
        train.train_and_evaluate(_config(nifti_root), workdir, progress=False)
    assert not (workdir / "results.md").exists()
    assert not _temporaries(workdir)
    monkeypatch.undo()

    again = train.train_and_evaluate(_config(nifti_root), workdir, progress=False)
    for name in layout.RUN_OUTPUTS:
        assert (workdir / name).is_file(), name
    assert again["test"] == results["test"]
    assert "| Output SR (multi-scale SRCNN) |" in (workdir / "results.md").read_text()
