"""Ablation sweeps: one workdir per value, table and plots, reruns skip, interruptions resume,
bad sweep fields and values fail before any training, and the command line works end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petsr_jax import train
from petsr_jax.config import build_config
from petsr_jax.evaluation import report
from petsr_jax.experiments import ablation
from petsr_jax.run import checkpoint, layout

REPO = Path(__file__).resolve().parents[1]
DEPTHS = ("1", "2")


def _config(root, **overrides):
    arg = f"tiny,data.root={root},train.epochs=2"
    arg += "".join(f",{k}={v}" for k, v in overrides.items())
    return build_config("deepsr", arg)


def _crash_after(calls_allowed: int):
    """A `train.jit_train_step` whose step raises, as a killed process would stop, after
    `calls_allowed` steps of the first run it is used for."""
    real_jit = train.jit_train_step
    budget = [calls_allowed]

    def crashing(train_step, mesh):
        jitted = real_jit(train_step, mesh)

        def wrapped(state, batch):
            budget[0] -= 1
            if budget[0] < 0:
                raise KeyboardInterrupt("simulated interruption")
            return jitted(state, batch)

        return wrapped

    return crashing


@pytest.fixture(scope="module")
def finished_sweep(nifti_root, tmp_path_factory):
    """A sweep whose second run was interrupted before step 6 (its last checkpoint at step 4),
    then the same sweep again; returns what the interruption left for the tests to compare."""
    runs = tmp_path_factory.mktemp("ablation_runs")
    config = _config(nifti_root)
    steps_per_run = 8
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.loop, "jit_train_step", _crash_after(steps_per_run + 5))
        with pytest.raises(KeyboardInterrupt):
            ablation.run_sweep(config, "depth", DEPTHS, runs, progress=False)
    interrupted = runs / "deepsr_x8_depth2"
    left = {
        "latest_step": checkpoint.Checkpoints(interrupted).latest_step(),
        "results": (interrupted / "results.json").exists(),
        "first_metrics": (runs / "deepsr_x8_depth1" / "metrics.jsonl").read_bytes(),
    }
    table = ablation.run_sweep(config, "depth", DEPTHS, runs, progress=False)
    return config, runs, table, left


def _out_dir(runs):
    return runs / "deepsr_x8_depth_sweep"


def test_each_value_trains_in_its_own_workdir(finished_sweep):
    _, runs, table, _ = finished_sweep
    assert [row["value"] for row in table["runs"]] == [1, 2]
    for row in table["runs"]:
        workdir = runs / f"deepsr_x8_depth{row['value']}"
        assert row["workdir"] == str(workdir)
        recorded = json.loads((workdir / "config.json").read_text())
        assert recorded["model"]["num_blocks"] == row["value"]
        assert json.loads((workdir / "results.json").read_text())["step"] == row["step"] == 8
    # One residual block adds two 3×3 convolutions of 8 → 8 features with biases.
    extra = table["runs"][1]["num_params"] - table["runs"][0]["num_params"]
    assert extra == 2 * (3 * 3 * 8 * 8 + 8)


def test_table_holds_val_and_test_metrics_of_the_best_params(finished_sweep):
    _, runs, table, _ = finished_sweep
    on_disk = json.loads((_out_dir(runs) / "ablation.json").read_text())
    assert on_disk == json.loads(json.dumps(table))
    assert on_disk["field"] == "model.num_blocks" and not on_disk["log_scale"]
    for row in table["runs"]:
        results = json.loads((Path(row["workdir"]) / "results.json").read_text())
        assert row["test"]["sr"]["psnr"] == results["test"]["sr"]["psnr"]
        # Training evaluated the same params on the same val slices when it chose the best step.
        steps, val_psnr = report.read_metrics(Path(row["workdir"]) / "metrics.jsonl")["val/sr/psnr"]
        at_best = val_psnr[list(steps).index(row["best_step"])]
        np.testing.assert_allclose(row["val"]["sr"]["psnr"], at_best, rtol=1e-5)
        for split in ("val", "test"):
            assert np.isfinite(row[split]["sr"]["ssim"])
            assert "lpips" not in row[split]["sr"]
            assert "eval.lpips is false" in row[split]["lpips_unavailable"]
    # The bicubic baseline does not depend on the model.
    first, second = table["runs"]
    for split in ("val", "test"):
        assert first[split]["bicubic"] == second[split]["bicubic"]
    assert first["val"]["num_slices"] > 0


def test_markdown_table_and_plots_are_written(finished_sweep):
    _, runs, table, _ = finished_sweep
    out = _out_dir(runs)
    markdown = (out / "ablation.md").read_text()
    assert markdown == ablation.table_markdown(table)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["bicubic", "1", "2"]
    assert "LPIPS n/a" in markdown
    for name in ("metrics_vs_depth.png", "training_curves.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_metrics_figure_draws_bicubic_lines_and_a_log_axis_for_learning_rates(finished_sweep):
    _, _, table, _ = finished_sweep
    fig = ablation.metrics_figure(table)
    psnr_axis = fig.axes[0]
    assert psnr_axis.get_xscale() == "linear"
    horizontal = {
        float(line.get_ydata()[0]) for line in psnr_axis.get_lines() if line.get_linestyle() == "--"
    }
    expected = {table["runs"][0][split]["bicubic"]["psnr"] for split in ("val", "test")}
    np.testing.assert_allclose(sorted(horizontal), sorted(expected))
    as_lr = {**table, "values": [1e-3, 1e-4], "log_scale": True}
    as_lr["runs"] = [
        {**row, "value": v} for row, v in zip(table["runs"], as_lr["values"], strict=True)
    ]
    assert ablation.metrics_figure(as_lr).axes[0].get_xscale() == "log"


def test_training_curves_show_every_run(finished_sweep):
    _, _, table, _ = finished_sweep
    loss_axis, psnr_axis = ablation.training_curves_figure(table).axes
    assert len(loss_axis.get_lines()) == len(DEPTHS)
    labels = [line.get_label() for line in psnr_axis.get_lines()]
    assert labels == ["depth=1", "depth=2", "bicubic"]
    steps = loss_axis.get_lines()[0].get_xdata()
    assert list(steps) == [2, 4, 6, 8]


def test_rerunning_a_sweep_skips_finished_runs(finished_sweep):
    config, runs, table, _ = finished_sweep
    workdirs = [Path(row["workdir"]) for row in table["runs"]]
    before = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for w in workdirs
        for p in (w / "metrics.jsonl", w / layout.VAL_RESULTS)
    }
    again = ablation.run_sweep(config, "depth", DEPTHS, runs, progress=False)
    assert again == table
    for p, (content, mtime) in before.items():
        assert (p.read_bytes(), p.stat().st_mtime_ns) == (content, mtime), p


def test_an_interrupted_run_resumes_and_a_finished_one_is_skipped(finished_sweep):
    _, runs, table, left = finished_sweep
    assert left == {
        "latest_step": 4,
        "results": False,
        "first_metrics": (runs / "deepsr_x8_depth1" / "metrics.jsonl").read_bytes(),
    }
    resumed = Path(table["runs"][1]["workdir"])
    logged = [
        json.loads(line)["step"]
        for line in (resumed / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert logged == [2, 4, 6, 8], "a restart from step 0 would log steps 2 and 4 twice"
    assert checkpoint.Checkpoints(resumed).latest_step() == 8


@pytest.mark.parametrize(
    "sweep, values, message",
    [
        ("model.depthh", ["1"], r"'model.depthh' names no config field.*depth = model.num_blocks"),
        ("batch_size", ["4"], r"matches eval.batch_size and train.batch_size"),
        ("depth", ["1", "two"], r"model.num_blocks: expected int, got 'two'"),
        ("lr", ["1e-3", "0.001"], r"0.001 given more than once"),
        ("depth", ["1", "-1"], r"model.num_blocks=-1: invalid config"),
        ("model.global_skip", ["image", "pixel"], r"(?s)global_skip=pixel.*expected 'image'"),
    ],
)
def test_bad_sweeps_fail_before_any_training(nifti_root, tmp_path, sweep, values, message):
    with pytest.raises(ablation.AblationError, match=message):
        ablation.run_sweep(_config(nifti_root), sweep, values, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_of_another_config_is_not_reused(finished_sweep):
    config, runs, _, _ = finished_sweep
    longer = _config(config.data.root, **{"train.epochs": 3, "train.log_every_steps": 1})
    with pytest.raises(ablation.AblationError, match=r"train.epochs: 2 in the workdir, 3 now"):
        ablation.plan_sweep(longer, "depth", DEPTHS, runs)
    # Logging and evaluation settings do not change what a run learned.
    chatty = _config(config.data.root, **{"train.log_every_steps": 1, "eval.lpips": True})
    assert len(ablation.plan_sweep(chatty, "depth", DEPTHS, runs)[1]) == 2
    # The same patient counts written the other way are the same split.
    spelled = ablation.with_value(config, "data.split", config.data.split.replace("/", ","))
    assert spelled.data.split != config.data.split
    assert len(ablation.plan_sweep(spelled, "depth", DEPTHS, runs)[1]) == 2


def test_values_are_typed_like_the_field_and_named_compactly(nifti_root):
    config = _config(nifti_root)
    assert ablation.resolve_field(config, "lr") == ("train.lr", "lr")
    assert ablation.resolve_field(config, "width") == ("model.width", "width")
    lr = ablation.Sweep("train.lr", "lr", ablation.parse_values(config, "train.lr", ["3e-4", 1]))
    assert lr.values == (3e-4, 1.0) and all(type(v) is float for v in lr.values)
    assert lr.log_scale
    assert ablation.run_name(config, lr, 3e-4) == "deepsr_x8_lr3e-4"
    assert ablation.run_name(config, lr, 2.5e-5) == "deepsr_x8_lr2.5e-5"
    field, label = ablation.resolve_field(config, "model.global_skip")
    skip = ablation.Sweep(field, label, ablation.parse_values(config, field, ["feature"]))
    assert not skip.log_scale
    assert ablation.run_name(config, skip, "feature") == "deepsr_x8_model_global_skip-feature"
    embedded = build_config("deepsr", "quick")
    depth = ablation.Sweep("model.num_blocks", "depth", (10,))
    assert ablation.run_name(embedded, depth, 10) == "deepsr_x8_small_depth10"


def test_command_line_reuses_finished_runs_with_config_overrides(finished_sweep, tmp_path):
    """`--config.train.epochs=2` must reach the config, or the finished runs would not match."""
    config, runs, table, _ = finished_sweep
    # No tcmalloc re-execution (a second interpreter start): the allocator is not checked here.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PETSR_ALLOCATOR": "system"}
    cmd = [
        sys.executable,
        str(REPO / "launch" / "ablate.py"),
        f"--config={REPO / 'configs' / 'deepsr.py'}:tiny,data.root={config.data.root}",
        "--config.train.epochs=2",
        "--sweep=depth",
        f"--values={','.join(DEPTHS)}",
        f"--runs={runs}",
        f"--out={tmp_path / 'table'}",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| bicubic |" in done.stdout
    assert json.loads((tmp_path / "table" / "ablation.json").read_text())["runs"] == json.loads(
        json.dumps(table["runs"])
    )
    bad = subprocess.run(
        [*cmd[:4], "--sweep=model.depthh", "--values=1", f"--runs={tmp_path / 'none'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "names no config field" in bad.stderr
    assert not (tmp_path / "none").exists()


def test_lpips_reason_is_kept_when_lpips_was_asked_for_but_unavailable():
    image = {"psnr": 30.0, "psnr_std": 1.0}
    summary = {"bicubic": image, "sr": image, "num_slices": 3, "num_patients": 1}
    missing = {**summary, "lpips_unavailable": "no weights in /x"}
    assert ablation.split_entry(missing, True)["lpips_unavailable"] == "no weights in /x"
    assert "eval.lpips is false" in ablation.split_entry(summary, False)["lpips_unavailable"]
    with_lpips = {**summary, "sr": {**image, "lpips": 0.1, "lpips_std": 0.01}}
    assert "lpips_unavailable" not in ablation.split_entry(with_lpips, True)
