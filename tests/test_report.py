"""results.md for people (columns, counts, how the run was made) and the training curves."""

import json

import numpy as np

from petsr_jax.evaluation import report


def _entry(with_brain: bool) -> dict:
    entry = {"psnr": 30.0, "psnr_std": 1.0, "ssim": 0.9, "ssim_std": 0.01}
    if with_brain:
        entry.update(psnr_brain=28.0, psnr_brain_std=1.0, ssim_brain=0.8, ssim_brain_std=0.01)
    return entry


def _results(with_brain: bool, num_slices: int = 69, num_patients: int = 1) -> dict:
    test = {
        "bicubic": _entry(with_brain),
        "sr": _entry(with_brain),
        "num_slices": num_slices,
        "num_patients": num_patients,
        "per_patient": {},
    }
    return {
        "model": "deepsr",
        "scale": 8,
        "step": 4,
        "best_step": 4,
        "weights": "best",
        "domain": "physical",
        "num_params": 1234,
        "brain_mask": with_brain,
        "eval_slices": "slices whose mean intensity is ≥ 50% of the brightest slice's",
        "test": test,
    }


def test_without_brain_masks_results_say_so_and_have_no_brain_columns():
    text = report.results_markdown(_results(with_brain=False))
    assert "brain" not in text.split("| image |")[1].splitlines()[0]  # the header row
    assert "inside the brain mask" not in text
    assert "no brain mask" in text and "mean intensity" in text
    assert "69 slices of 1 patient;" in text


def test_with_brain_masks_the_brain_columns_are_shown():
    text = report.results_markdown(_results(with_brain=True, num_slices=1, num_patients=3))
    assert "PSNR brain" in text and "inside the brain mask" in text and "28.00 ± 1.00" in text
    assert "1 slice of 3 patients;" in text


def test_results_from_before_the_mask_flag_follow_their_scores():
    results = _results(with_brain=False)
    del results["brain_mask"]
    assert not report.has_brain_mask(results)
    results["test"]["sr"] = _entry(with_brain=True)
    assert report.has_brain_mask(results)


def test_results_end_with_how_the_run_was_made():
    record = {
        "command": ["launch/main.py", "--config=configs/deepsr.py:quick"],
        "git_commit": "abc123",
        "versions": {"petsr_jax": "0.1", "jax": "0.7.0", "flax": "0.11", "grain": None},
        "devices": {"kind": "cpu", "count": 4},
    }
    last = report.results_markdown(_results(with_brain=True), record).strip().splitlines()[-1]
    for fact in ("launch/main.py --config=configs/deepsr.py:quick", "abc123", "jax 0.7.0"):
        assert fact in last, fact
    assert "4 × cpu" in last and "run.json" in last and "grain" not in last


def test_read_metrics_keeps_the_last_entry_of_a_step_logged_twice(tmp_path):
    lines = [
        {"step": 0, "about": {"train/images_per_s": "what it measures"}},
        {"step": 2, "train/loss": 0.5},
        {"step": 4, "train/loss": 0.4},
        {"step": 4, "val/sr/psnr": 20.0},
        {"step": 4, "train/loss": 0.3},  # logged again after a resume from step 2
        {"step": 6, "train/loss": 0.2},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "train/lo')
    curves = report.read_metrics(path)
    np.testing.assert_array_equal(curves["train/loss"][0], [2, 4, 6])
    np.testing.assert_array_equal(curves["train/loss"][1], [0.5, 0.3, 0.2])
    np.testing.assert_array_equal(curves["val/sr/psnr"][0], [4])
    assert "about" not in curves


def test_training_curves_plot_loss_and_validation_psnr_of_each_run(tmp_path):
    for name, loss in (("a", 0.5), ("b", 0.25)):
        (tmp_path / name).mkdir()
        lines = [
            {"step": 2, "train/loss": loss},
            {"step": 4, "train/loss": loss / 2, "val/sr/psnr": 25.0, "val/bicubic/psnr": 22.0},
        ]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    fig = report.training_curves_figure([("a", tmp_path / "a"), ("b", tmp_path / "b")])
    loss_axis, psnr_axis = fig.axes
    assert [line.get_label() for line in loss_axis.get_lines()] == ["a", "b"]
    np.testing.assert_array_equal(loss_axis.get_lines()[1].get_ydata(), [0.25, 0.125])
    assert [line.get_label() for line in psnr_axis.get_lines()] == ["a", "b", "bicubic"]


def test_image_grid_keeps_every_panel_three_inches_with_or_without_colour_bars(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    hr = rng.uniform(size=(2, 16, 16)).astype(np.float32)
    sr = hr + rng.normal(0, 0.05, hr.shape).astype(np.float32)
    lesions = [hr[0] > 0.9, np.zeros((16, 16), bool)]
    columns = [
        report.GridColumn("model", sr),
        report.GridColumn("original", hr),
        report.GridColumn("T1", [hr[0], None], "mr"),  # the second slice has no MR
    ]
    shape = report.image_grid(tmp_path / "plain.png", columns, ["a", "b"], outlines=lesions)
    assert shape == (2, 3)
    with Image.open(tmp_path / "plain.png") as png:
        assert png.size == (3 * 300, 2 * 300)
    # The run's figure: a colour bar per scale, in 1.6 inches beside the four panels.
    report.comparison_figure(tmp_path / "bars.png", hr, hr, sr)
    with Image.open(tmp_path / "bars.png") as png:
        assert png.size == (4 * 300 + 160, 2 * 300)
