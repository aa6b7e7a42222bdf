"""Ambiguous inputs refused, records that agree with themselves, errors without tracebacks.

Each case was, before, a silent wrong or mislabelled result, or a traceback:

- patients of different pixel spacings, and one patient with two scans, are refused by name;
- a config.json edited after training is refused at load and at training (every checkpoint
  records the config it was trained with);
- a workdir holding scans, or anything that is not a run, is refused before anything is written;
- a resumed run logs every step once in metrics.jsonl;
- another patient's T1 on the PET's grid is a warning;
- an output folder that becomes unwritable keeps the activity record in step with the outputs;
- reproduce and ablate name their own flags (`--runs`);
- damaged best params fall back to the latest full state with a warning and nothing else;
- an all-zero T1, a series with a re-labelled slice, an output path that is a file, a refused
  run's empty folders, a DeepSR of depth 0 and a one-slice patient are each said by name.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pydicom
import pytest
from conftest import blob_volume, make_nifti_root

import petsr_jax
from petsr_jax import data, inference, io, train
from petsr_jax.config import build_config
from petsr_jax.data import mr
from petsr_jax.experiments import ablation, reproduce
from petsr_jax.models import create_model
from petsr_jax.run import checkpoint, identity, layout
from petsr_jax.volume import Volume

REPO = Path(__file__).resolve().parents[1]


def _config(root, model="srcnn", **overrides):
    arg = f"tiny,data.root={root},train.epochs=2,train.log_every_steps=1"
    arg += "".join(f",{k}={v}" for k, v in overrides.items())
    return build_config(model, arg)


@pytest.fixture(scope="module")
def run(nifti_root, tmp_path_factory):
    """A finished tiny SRCNN run: 8 steps, checkpoints at 4 and 8, every step logged."""
    workdir = tmp_path_factory.mktemp("hardening_more") / "run"
    train.train_and_evaluate(_config(nifti_root), workdir, progress=False)
    return workdir


def _copy(workdir: Path, target: Path) -> Path:
    return Path(shutil.copytree(workdir, target))


def _params_like(model="srcnn"):
    config = build_config(model, "tiny")
    return create_model(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]


def _subprocess(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


def _nifti_patient(root: Path, pid: str, seed: int, spacing=(2.0, 2.0, 2.0), slices=8) -> Path:
    vol, _ = blob_volume(seed, slices)
    path = root / f"{pid}.nii.gz"
    io.write_nifti(Volume(vol, spacing, units="BQML", patient_id=pid), path)
    return path


# ------------------------------------------------------------- 1. different pixel spacings


def test_patients_of_different_pixel_spacings_are_refused_naming_both_and_the_fix(tmp_path):
    root = make_nifti_root(tmp_path / "root", n_patients=3)
    _nifti_patient(root, "pat-07", 7, spacing=(2.0, 3.0, 3.0))
    with pytest.raises(data.DataError) as error:
        data.build_slice_set(root, ["pat-00", "pat-01", "pat-07"], eval_split=False)
    message = str(error.value)
    assert "different pixel spacings: 2 × 2 mm (pat-00, pat-01) and 3 × 3 mm (pat-07)" in message
    assert "petsr_jax.io.resample(volume, spacing_mm)" in message
    # Within 1 percent is one spacing (DICOM decimal strings, float32 NIfTI headers).
    _nifti_patient(root, "pat-08", 8, spacing=(2.0, 2.01, 2.01))
    one = data.build_slice_set(root, ["pat-00", "pat-08"], eval_split=False)
    assert one.pixel_spacing[0] == pytest.approx(2.005)


def test_a_test_patient_at_another_spacing_stops_training_and_leaves_no_folder(tmp_path):
    """Each split alone has one spacing; the run does not. A refused run leaves nothing."""
    root = make_nifti_root(tmp_path / "root", n_patients=3)
    _nifti_patient(root, "pat-07", 7, spacing=(2.0, 4.0, 4.0))
    split = {"train": ["pat-00", "pat-01"], "val": ["pat-02"], "test": ["pat-07"]}
    (root / "split.json").write_text(json.dumps(split))
    workdir = tmp_path / "runs" / "new" / "run"
    with pytest.raises(data.DataError, match=r"4 × 4 mm \(test patient pat-07\)"):
        train.train_and_evaluate(_config(root), workdir, progress=False)
    assert not (tmp_path / "runs").exists(), "the refused run's new folders are removed"


# ------------------------------------------------------------ 2. one patient, two scans


def test_a_patient_with_a_dicom_folder_and_a_nifti_file_is_refused_naming_both(tmp_path):
    root = make_nifti_root(tmp_path / "root", n_patients=2)
    volume = io.read_volume(root / "pat-01.nii.gz")
    io.write_dicom(volume, root / "pat-01")
    expected = r"pat-01/ \(a DICOM folder\) and pat-01\.nii\.gz"
    with pytest.raises(data.DataError, match=expected):
        data.list_patients(root)
    with pytest.raises(inference.InferenceError, match=expected):  # enhancement's input
        inference.plan_outputs(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.copy(root / "pat-00.nii.gz", root / "pat-00.nii")  # .nii beside .nii.gz too
    with pytest.raises(data.DataError, match=r"pat-00\.nii and pat-00\.nii\.gz"):
        data.list_patients(root)


# -------------------------------------------------------------- 3. config.json edited


def _edit_config(workdir: Path, **fields) -> None:
    path = workdir / "config.json"
    config = json.loads(path.read_text())
    for dotted, value in fields.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(json.dumps(config))


def test_every_checkpoint_records_the_config_it_was_trained_with(run):
    recorded = json.loads((run / "config.json").read_text())
    for folder in ("checkpoints", "best"):
        for step_dir in (run / folder).iterdir():
            assert checkpoint.trained_config(step_dir) == recorded, step_dir


def test_an_edited_config_json_is_refused_at_load_and_at_training(run, nifti_root, tmp_path):
    workdir = _copy(run, tmp_path / "run")
    _edit_config(workdir, scale=16)
    expected = r"config\.json was edited after training: scale: 8 when trained, 16 in config\.json"
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        petsr_jax.load(workdir)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    for scale in (16, 8):  # the edited config, and the one the params were trained with
        with pytest.raises(layout.WorkdirError, match=expected):
            train.train_and_evaluate(_config(nifti_root, scale=scale), workdir, progress=False)
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before, "nothing written"
    # Evaluation settings are the user's to change: the params are the same.
    _edit_config(workdir, scale=8, **{"eval.batch_size": 3})
    assert petsr_jax.load(workdir).batch_size == 3


# ----------------------------------------------------------- 4. a workdir of someone's data


def test_a_workdir_holding_scans_or_other_files_is_refused_before_anything_is_written(
    nifti_root, tmp_path
):
    series = tmp_path / "series"
    io.write_dicom(io.read_volume(nifti_root / "pat-00.nii.gz"), series)
    folders = {
        "a DICOM series": series,
        "a NIfTI file": make_nifti_root(tmp_path / "niftis", n_patients=1),
        "a folder of series": tmp_path / "patients",
        "other files": tmp_path / "notes",
    }
    shutil.copytree(series, folders["a folder of series"] / "sub-01")
    folders["other files"].mkdir()
    (folders["other files"] / "notes.txt").write_text("my notes")
    for what, folder in folders.items():
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        match = "is not a petsr_jax run" if what == "other files" else "holds scans"
        with pytest.raises(layout.WorkdirError, match=f"workdir {folder} {match}"):
            train.train_and_evaluate(_config(nifti_root), folder, progress=False)
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before, what


def test_a_run_workdir_with_notes_in_it_is_still_a_run(run):
    identity.check_not_data(run)  # config.json and the run's own files
    (run / "notes.txt").write_text("lr sweep, 2nd try")
    try:
        identity.check_not_data(run)
    finally:
        (run / "notes.txt").unlink()


# ----------------------------------------------------------- 5. resumed runs log steps once


def _metric_lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_resumed_after_a_kill_logs_every_step_once(run, nifti_root, tmp_path):
    """As a kill -9 after step 8 was logged but before its checkpoint leaves the workdir."""
    workdir = _copy(run, tmp_path / "run")
    for name in layout.RUN_OUTPUTS:
        (workdir / name).unlink()
    shutil.rmtree(workdir / "checkpoints" / "8")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')  # a line cut by the kill
    train.train_and_evaluate(_config(nifti_root), workdir, progress=False)
    lines = _metric_lines(workdir)
    keys = [(line["step"], key) for line in lines for key in line if key != "step"]
    assert len(keys) == len(set(keys)), "a step logged twice"
    losses = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in losses] == list(range(1, 9))
    reference = {
        line["step"]: line["train/loss"] for line in _metric_lines(run) if "train/loss" in line
    }
    assert {line["step"]: line["train/loss"] for line in losses} == reference


# ---------------------------------------------------------- 6. another patient's T1


def _mr_resolver():
    """An MR-guided DeepSR with untrained params: enough to check inputs (nothing is run)."""
    config = build_config("deepsr", "tiny,mr")
    model = create_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 2)))["params"]
    return inference.SuperResolver(config, params)


def _t1_of(pet: np.ndarray) -> np.ndarray:
    """A T1-like image of the same anatomy: a monotone function of the PET plus a head."""
    return (3000.0 - 0.2 * pet + 500.0 * (pet > 0)).astype(np.float32)


def _pairing_problems(problems: list[str]) -> list[str]:
    return [p for p in problems if "T1" in p]


def test_another_patients_t1_on_the_same_grid_is_a_warning(tmp_path):
    root = tmp_path / "root"
    (root / "t1").mkdir(parents=True)
    for seed, pid in enumerate(("pat-00", "pat-01")):
        _nifti_patient(root, pid, seed)
        pet = io.read_volume(root / f"{pid}.nii.gz")
        t1 = pet.replace(data=_t1_of(pet.data), units="unknown")
        io.write_nifti(t1, root / "t1" / f"{pid}.nii.gz")
    sr = _mr_resolver()
    pet = io.read_volume(root / "pat-00.nii.gz")
    own = io.read_volume(root / "t1" / "pat-00.nii.gz")
    other = io.read_volume(root / "t1" / "pat-01.nii.gz")
    assert _pairing_problems(sr.check_input(pet, "pet", mr=own)) == []
    problems = _pairing_problems(sr.check_input(pet, "pet", mr=other))
    assert len(problems) == 2, problems
    assert "data-root patient pat-00 but the T1" in problems[0]
    assert "data-root patient pat-01" in problems[0] and str(root / "t1") in problems[0]
    assert "matches the PET no better in place than shifted by 3 voxels" in problems[1]
    # Without any id (arrays, a T1 named t1.nii.gz), the anatomy alone still tells.
    arrays = mr.pairing_warnings(pet.data, other.data, "pet")
    assert len(arrays) == 1 and "no better in place" in arrays[0]
    assert mr.pairing_warnings(pet.data, own.data) == []


def test_dicom_patient_ids_that_differ_are_a_warning():
    vol, _ = blob_volume(0)

    def with_patient(patient_id, data):
        header = pydicom.Dataset()
        header.PatientID = patient_id
        return Volume(data, (2.0, 2.0, 2.0), patient_id=patient_id, headers=[header] * 8)

    pet = with_patient("P-1001", vol)
    problems = mr.pairing_warnings(pet, with_patient("P-2002", _t1_of(vol)), "scan")
    assert problems == [
        "scan: the PET is of PatientID P-1001 but the T1 (mr=) of PatientID P-2002; give this "
        "patient's own co-registered T1"
    ]
    assert mr.pairing_warnings(pet, with_patient("P-1001", _t1_of(vol))) == []


# ---------------------------------------------- 7. an output folder that becomes unwritable

# launch/enhance.py with the second write of the activity record refused, as by a folder made
# read-only after the first scan.
_RECORD_REFUSED = """
import errno, os, runpy, sys
real_replace = os.replace
calls = []
def replace(source, target, *args, **kwargs):
    if str(target).endswith("activity_changes.json"):
        calls.append(target)
        if len(calls) == 2:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source))
    return real_replace(source, target, *args, **kwargs)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_unwritable_activity_record_is_one_line_and_keeps_record_and_outputs_in_step(
    tiny_deepsr_workdir, tmp_path
):
    patients = make_nifti_root(tmp_path / "patients", n_patients=3)
    out = tmp_path / "out"
    done = _subprocess(
        "-c",
        _RECORD_REFUSED,
        REPO / "launch" / "enhance.py",
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={patients}",
        f"--output={out}",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("enhance.py: error:")]
    assert len(error) == 1 and error[0].startswith(
        f"enhance.py: error: {out / 'activity_changes.json'}: cannot write the activity record "
        "(Permission denied). pat-01's outputs were removed again"
    )
    assert "enhance pat-01 and the 1 scan(s) after it again" in error[0]
    assert sorted(p.name for p in out.iterdir()) == ["activity_changes.json", "pat-00.nii.gz"]
    assert list(json.loads((out / "activity_changes.json").read_text())) == ["pat-00"]


# ------------------------------------------------- 8. reproduce names --runs, not --workdir


def test_reproduce_meeting_a_run_of_another_config_names_runs(run, nifti_root, tmp_path):
    settings = reproduce.Settings(
        scales=(8,),
        config_arg=f"tiny,data.root={nifti_root}",
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "report",
    )
    _copy(run, tmp_path / "runs" / reproduce.run_name("srcnn", 8, settings))
    with pytest.raises(reproduce.ReproduceError) as error:
        reproduce.reproduce(settings, progress=False)
    message = str(error.value)
    assert "holds a run of another config" in message and "data.domain" in message
    assert "Give another --runs folder" in message and "--workdir" not in message


def test_ablate_meeting_a_run_of_another_config_names_runs(run, nifti_root, tmp_path):
    config = _config(nifti_root, model="deepsr")
    swept, runs = ablation.plan_sweep(config, "depth", ["2"], tmp_path / "runs")
    _copy(run, runs[0][2])  # an SRCNN run where the depth-2 DeepSR goes
    with pytest.raises(ablation.AblationError) as error:
        ablation.plan_sweep(config, "depth", ["2"], tmp_path / "runs")
    assert "Give another --runs folder" in str(error.value)
    assert "--workdir" not in str(error.value)


# ------------------------------------------------------------ 9. damaged best params


def _truncate_arrays(step_dir: Path) -> None:
    for path in step_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)


def test_damaged_best_params_fall_back_to_the_last_state_with_a_warning(run, tmp_path):
    workdir = _copy(run, tmp_path / "run")
    best = next((workdir / "best").iterdir())
    _truncate_arrays(best)
    with pytest.warns(UserWarning) as caught:
        params = checkpoint.restore_params(workdir, _params_like(), which="best")
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"checkpoint {best} cannot be read" in message
    assert f"Using the latest full state, {workdir / 'checkpoints' / '8'}, instead" in message
    assert "--checkpoint=last" in message and "tensorstore_spec" not in message
    last = checkpoint.restore_params(workdir, _params_like(), which="last")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(last), strict=True):
        np.testing.assert_array_equal(a, b)
    # A training that ends on them scores its last params, saying so.
    ckpts = checkpoint.Checkpoints(workdir)
    try:
        with pytest.warns(UserWarning, match="Using the run's last params instead of the best"):
            assert ckpts.restore_best(_params_like()) is None
    finally:
        ckpts.close()


def test_enhance_with_damaged_best_params_warns_once_without_tracebacks(
    tiny_deepsr_workdir, nifti_root, tmp_path
):
    workdir = _copy(tiny_deepsr_workdir, tmp_path / "run")
    _truncate_arrays(next((workdir / "best").iterdir()))
    done = _subprocess(
        REPO / "launch" / "enhance.py",
        f"--workdir={workdir}",
        f"--input={nifti_root / 'pat-00.nii.gz'}",
        f"--output={tmp_path / 'out'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
    assert "Using the latest full state" in done.stderr
    assert (tmp_path / "out" / "pat-00.nii.gz").is_file()


def _abandoned_failed_task(error: Exception) -> None:
    """A task that failed and whose exception nobody retrieves, as a failed restore leaves."""
    import asyncio
    import gc

    async def fail():
        raise error

    loop = asyncio.new_event_loop()
    task = loop.create_task(fail())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()


def test_reads_orphaned_by_a_failed_restore_are_not_reported_other_errors_are(caplog):
    """asyncio reports a failed, never-retrieved task when the collector reaches it, whenever
    that is: after a damaged restore, each sibling read's TensorStore error would print a
    traceback around the one-line warning. Those (and only those) are dropped."""
    checkpoint._ignore_orphaned_reads()
    tensorstore_error = ValueError(
        "OUT_OF_RANGE: Error reading \"conv_out.bias/.zarray\" [tensorstore_spec='{}']"
    )
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _abandoned_failed_task(tensorstore_error)
        assert not [r for r in caplog.records if r.name == "asyncio"]
        _abandoned_failed_task(KeyError("something else"))
    reported = [r for r in caplog.records if r.name == "asyncio"]
    assert len(reported) == 1 and "never retrieved" in reported[0].getMessage()
    assert isinstance(reported[0].exc_info[1], KeyError)


# ------------------------------------------------------------------------- said by name


def test_an_all_zero_t1_names_its_file(tmp_path):
    root = make_nifti_root(tmp_path / "root", n_patients=1)
    (root / "t1").mkdir()
    pet = io.read_volume(root / "pat-00.nii.gz")
    io.write_nifti(pet.replace(data=np.zeros_like(pet.data)), root / "t1" / "pat-00.nii.gz")
    with pytest.raises(data.DataError, match=rf"{root / 't1' / 'pat-00.nii.gz'}: its maximum is 0"):
        data.build_slice_set(root, ["pat-00"], eval_split=False, guidance=("t1",))
    t1 = io.read_volume(root / "t1" / "pat-00.nii.gz")
    with pytest.raises(inference.IncompatibleInput, match=rf"{root / 't1'}/pat-00\.nii\.gz: its"):
        _mr_resolver().guide_for(t1, pet)


def test_a_series_with_a_relabelled_slice_names_the_file_and_the_count(tmp_path):
    vol, _ = blob_volume(0)
    written = io.write_dicom(Volume(vol, (2.0, 2.0, 2.0), units="BQML"), tmp_path / "series")
    header = pydicom.dcmread(written[0])
    header.Modality = "CT"
    header.save_as(written[0])
    with pytest.raises(io.ScanError) as error:
        io.read_volume(tmp_path / "series")
    message = str(error.value)
    assert f"mixes modalities: 7 PT, 1 CT ({written[0].name})" in message
    assert "fix the Modality" in message
    assert [info.modality for info in io.list_series(tmp_path / "series")] == ["PT"]


def test_an_output_path_that_is_a_file_is_refused_before_any_work(nifti_root, tmp_path):
    blocker = tmp_path / "out.txt"
    blocker.write_text("")
    with pytest.raises(inference.InferenceError, match="out.txt: is a file, not a folder"):
        inference.plan_outputs(nifti_root / "pat-00.nii.gz", blocker)
    with pytest.raises(inference.InferenceError, match="lies under .*out.txt, which is a file"):
        inference.plan_outputs(nifti_root / "pat-00.nii.gz", blocker / "sub")


def test_ablation_refuses_a_deepsr_of_depth_0_naming_the_field(nifti_root, tmp_path):
    config = _config(nifti_root, model="deepsr")
    with pytest.raises(ablation.AblationError, match=r"model\.num_blocks must be ≥ 1 for DeepSR"):
        ablation.plan_sweep(config, "depth", ["0", "2"], tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_one_slice_training_patient_is_said_with_the_steps_it_makes(tmp_path, caplog):
    root = make_nifti_root(tmp_path / "root", n_patients=1)
    _nifti_patient(root, "pat-09", 9, slices=1)
    train_set = data.build_slice_set(root, ["pat-00", "pat-09"], eval_split=False)
    with caplog.at_level(logging.WARNING, logger="petsr_jax.data.slices"):
        data.slices.check_run_sets(root, 4, train=train_set)
    assert (
        "training patient(s) pat-09 hold a single slice (a 2D image, not a volume); the train "
        "split has 9 slices, 2 steps of train.batch_size=4 per epoch, 1 slice(s) left out"
    ) in caplog.text
    caplog.clear()
    volumes_only = data.build_slice_set(root, ["pat-00"], eval_split=False)
    with caplog.at_level(logging.WARNING, logger="petsr_jax.data.slices"):
        data.slices.check_run_sets(root, 4, train=volumes_only)
    assert "single slice" not in caplog.text
