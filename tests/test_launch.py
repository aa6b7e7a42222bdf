"""The launch scripts as a new user meets them: help that lists the config variants and one
example per use, a bare command that answers with a usage line, messages that say what exists
and what to run, results worth stopping at printed as warnings, and enhance --resample."""

import ast
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import petsr_jax
from petsr_jax import cli, inference, io, quantitation
from petsr_jax.config import FLAG_HELP, build_config, variants
from petsr_jax.run import checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p for p in (REPO / "launch").glob("*.py") if p.name not in ("nema.py", "deconvolve.py")
)
QUICK_COMMAND = "python launch/main.py --config=configs/deepsr.py:scale=8,quick"


def _launch(script: str, *args, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_PRELOAD")}
    env.update(JAX_PLATFORMS="cpu", PETSR_ALLOCATOR="system")
    cmd = [sys.executable, str(REPO / "launch" / script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# ------------------------------------------------------------------------------ help and usage


def test_the_help_lists_every_variant_of_the_config_files_with_its_workdir():
    text = cli.variants_help()
    defined = set(variants("deepsr")) | set(variants("srcnn"))
    assert defined == set(FLAG_HELP), "every variant has its line of help, and only those"
    flowing = " ".join(text.split())  # long lines of help are wrapped
    for name in defined:
        assert re.search(rf"^  {name}\s", text, re.M), name
        assert f" {name} {' '.join(FLAG_HELP[name].split())} -> " in flowing, name
    # The workdir a variant trains into is the one a run of it makes (the README's quick run).
    assert "runs/deepsr_x8_small_b6" in text and "runs/srcnn_x8_small" in text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_script_shows_its_examples_one_per_line_and_the_variants(script):
    tree = ast.parse(script.read_text())
    doc = ast.get_docstring(tree, clean=False)
    rendered = cli.help_text(doc)  # what `--help` prints above the flags
    examples = [line for line in rendered.splitlines() if "python launch/" in line]
    assert examples, f"{script.name}: no example in its help"
    for line in examples:
        # One command per line: nothing wrapped into the next, no continuation left over.
        assert line.count("python launch/") == 1, line
        assert not line.rstrip().endswith("\\"), line
    assert f"python launch/{script.name}" in rendered
    assert "Config variants" in rendered and "quick" in rendered
    # The script hands its main to cli.run, which puts that text under --help.
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "run"
        and getattr(node.func.value, "id", None) == "cli"
    ]
    assert calls, f"{script.name} does not run through petsr_jax.cli.run"


def test_main_alone_prints_a_usage_line_with_an_example_and_exits_2():
    run = _launch("main.py")
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("usage: python launch/main.py --config=configs/<model>.py:")
    assert f"example: {QUICK_COMMAND}\n" in run.stderr
    assert "FATAL" not in run.stderr and "Traceback" not in run.stderr


def test_enhance_help_names_the_quick_runs_workdir_and_every_variant():
    run = _launch("enhance.py", "--help")
    assert run.returncode == 0, run.stderr
    assert "--workdir=runs/deepsr_x8_small_b6 --input=scan_dicom/ --output=sr/\n" in run.stdout
    assert (
        "python launch/enhance.py --workdir=runs/deepsr_x8_small_b6 --input=scan/ --output=rec/"
        " --mode=reconstruct\n" in run.stdout
    )
    for name in FLAG_HELP:
        assert re.search(rf"^  {name}\s", run.stdout, re.M), name
    assert "--resample" in run.stdout


# ------------------------------------------------------------------- workdirs a user mistypes


def _started_run(workdir: Path, command: list[str]) -> Path:
    """A workdir as launch/main.py leaves it before its first checkpoint."""
    workdir.mkdir(parents=True)
    config = build_config("deepsr", "scale=8,quick")
    (workdir / "config.json").write_text(config.to_json())
    run = {"total_steps": 800, "steps_per_epoch": 20, "command": command}
    (workdir / "run.json").write_text(json.dumps(run))
    return workdir


def test_a_missing_workdir_names_the_nearest_run_and_the_command_that_trained_it(tmp_path):
    runs = tmp_path / "runs"
    _started_run(
        runs / "deepsr_x8_small_b6", ["launch/main.py", "--config=configs/deepsr.py:scale=8,quick"]
    )
    (runs / "not_a_run").mkdir()  # no config.json: never suggested
    with pytest.raises(inference.InferenceError) as error:
        petsr_jax.load(runs / "deepsr_x8_small")
    message = str(error.value)
    assert message.startswith(f"{runs / 'deepsr_x8_small'}: no such workdir; nearest: ")
    assert f"{runs / 'deepsr_x8_small_b6'} (trained by: {QUICK_COMMAND})" in message
    assert "not_a_run" not in message and "\n" not in message


def test_a_missing_workdir_of_a_variants_name_says_how_to_train_it(tmp_path):
    with pytest.raises(inference.InferenceError) as error:
        inference.read_config(tmp_path / "runs" / "deepsr_x8_small_b6")
    message = str(error.value)
    assert (
        f"to train it: {QUICK_COMMAND} --workdir={tmp_path / 'runs' / 'deepsr_x8_small_b6'}"
        not in message
    )  # a folder named runs/ needs no --workdir
    assert f"to train it: {QUICK_COMMAND}" in message
    with pytest.raises(inference.InferenceError) as error:
        inference.read_config(tmp_path / "elsewhere" / "srcnn_x8_small")
    assert (
        "to train it: python launch/main.py --config=configs/srcnn.py:scale=8,quick "
        f"--workdir={tmp_path / 'elsewhere' / 'srcnn_x8_small'}"
    ) in str(error.value)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_killed_before_its_first_checkpoint_says_so_and_how_to_start_it(tmp_path):
    command = ["launch/main.py", "--config=configs/deepsr.py:scale=8,quick"]
    workdir = _started_run(tmp_path / "runs" / "deepsr_x8_small_b6", command)
    lock = {"host": socket.gethostname(), "pid": _dead_pid(), "started": 0, "token": "x"}
    (workdir / ".lock").write_text(json.dumps(lock))
    with pytest.raises(checkpoint.CheckpointError) as error:
        petsr_jax.load(workdir)
    message = str(error.value)
    assert "never reached a checkpoint (the first comes at step 200 of 800)" in message
    assert f"its process {lock['pid']} is not running" in message
    assert message.endswith(f"rerunning its training command starts it: {QUICK_COMMAND}")
    assert "is it the workdir of a training run" not in message

    # While its training runs (the lock's process is alive), the reader is told to wait.
    lock["pid"] = os.getpid()
    (workdir / ".lock").write_text(json.dumps(lock))
    with pytest.raises(checkpoint.CheckpointError, match="not reached its first checkpoint yet"):
        petsr_jax.load(workdir)


# ------------------------------------------------------------------------ results to stop at


def _change(total_in, total_out, max_in, max_out):
    return quantitation.ActivityChange("BQML", total_in, total_out, max_in, max_out)


def test_large_activity_changes_are_warnings_and_small_ones_are_not():
    # What the quick model does to its own cohort's scans: no warning.
    assert inference.activity_warnings(_change(1000, 970, 10, 12.5)) == []
    assert inference.activity_warnings(_change(1000, 1030, 10, 13.4)) == []
    # The NEMA phantom enhanced as it is: +20.4 percent of activity created.
    (nema,) = inference.activity_warnings(_change(1000, 1204, 10, 9.94))
    assert "total activity is +20.4 percent against the input's" in nema
    (flattened,) = inference.activity_warnings(_change(1000, 1010, 10, 7.5))
    assert "maximum (SUVmax) is −25.0 percent against the input's (more than 10% down)" in flattened
    (raised,) = inference.activity_warnings(_change(1000, 1010, 10, 16))
    assert "maximum (SUVmax) is +60.0 percent against the input's (more than 50% up)" in raised


def test_a_model_below_bicubic_is_a_warning_with_two_decimals():
    scores = {"bicubic/psnr": 43.9123, "sr/psnr": 41.1289, "bicubic/ssim": 0.95, "sr/ssim": 0.96}
    (problem,) = inference.score_warnings(scores)
    assert "PSNR 41.13 dB against 43.91 dB" in problem
    assert inference.score_warnings({**scores, "sr/psnr": 44.0}) == []
    (both,) = inference.score_warnings({**scores, "sr/ssim": 0.94})
    assert "(PSNR 41.13 dB against 43.91 dB, SSIM 0.940 against 0.950)" in both


# ---------------------------------------------------------------------------- enhance --resample


@pytest.fixture(scope="module")
def coarse_scan(nifti_root, tmp_path_factory):
    """A test patient of the tiny run's data (2 mm pixels) at 3 mm pixels, as a NIfTI file."""
    folder = tmp_path_factory.mktemp("coarse")
    scan = io.resample(io.read_volume(nifti_root / "pat-03.nii.gz"), 3.0)
    io.write_nifti(scan, folder / "coarse.nii.gz")
    return folder / "coarse.nii.gz"


def test_enhance_resample_works_at_the_training_spacing_and_writes_on_the_input_grid(
    tiny_deepsr_workdir, tiny_deepsr, coarse_scan, tmp_path
):
    run = _launch(
        "enhance.py",
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={coarse_scan}",
        f"--output={tmp_path / 'out'}",
        "--resample",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    source = io.read_volume(coarse_scan)
    _, rows, cols = source.shape
    said = (
        f"coarse: resampled 3 × 3 mm pixels ({rows} × {cols}) to the training data's 2 × 2 mm "
        "pixels (32 × 32), enhanced there, and resampled back onto the input's grid"
    )
    assert said in run.stdout, run.stdout
    assert "resample the scan" not in run.stderr  # the spacing warning is gone

    written = io.read_volume(tmp_path / "out" / "coarse.nii.gz")
    assert written.shape == source.shape and written.units == source.units
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    # Enhanced at 2 mm (the resolver's output, non-negative there), back onto the input's grid,
    # then what the interpolation undershoots clipped at 0 activity there.
    at_training = io.resample(source, 2.0)
    enhanced = tiny_deepsr(at_training, check_units=None)
    expected = io.resample(enhanced, like=source)
    np.testing.assert_allclose(written.data, np.maximum(expected.data, 0), rtol=1e-4, atol=1e-2)

    # Its activity change against the input is a warning exactly when it is large.
    change = json.loads((tmp_path / "out" / "activity_changes.json").read_text())["coarse"]
    large = abs(change["total_change"]) > inference.TOTAL_ACTIVITY_TOLERANCE
    assert ("warning: coarse: the output's total activity is" in run.stderr) == large


def test_without_resample_the_spacing_warning_is_a_short_warning_line(
    tiny_deepsr_workdir, coarse_scan, tmp_path
):
    run = _launch(
        "enhance.py",
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={coarse_scan}",
        f"--output={tmp_path / 'out'}",
        "--format=nifti",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if "pixels are 3 × 3 mm" in line]
    assert lines and lines[0].startswith("warning: "), run.stderr
    assert "--resample" in lines[0]
    # No absl prefix (`W1204 15:01:12.196732 140381670602688 enhance.py:182]`) on any line.
    assert not re.search(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", run.stderr, re.M), run.stderr
