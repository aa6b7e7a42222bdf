"""What a finished run leaves for people: results.json, results.md and figures (the test
slices side by side, and training curves from metrics.jsonl, shared with the ablations).

Every file goes through `petsr_jax.io.files`, so an interruption never leaves a half-written
result; the files' names are `petsr_jax.run.layout`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from petsr_jax.evaluation import regional
from petsr_jax.evaluation.predict import predict_slices
from petsr_jax.io.files import save_figure_atomic, write_atomic, write_json_atomic
from petsr_jax.run import layout


def count_of(n: int, noun: str) -> str:
    """`1 patient`, `3 patients`: a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def mean_std_cell(entry: dict, metric: str, digits: int, missing: str = "") -> str:
    """`mean ± std` of a summarised metric, or `n/a` (with why, when given) where absent."""
    if metric not in entry:
        return f"n/a ({missing})" if missing else "n/a"
    return f"{entry[metric]:.{digits}f} ± {entry[metric + '_std']:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


METRICS = (
    ("psnr", "PSNR (dB)", 2),
    ("ssim", "SSIM", 3),
    ("lpips", "LPIPS", 3),
    ("psnr_brain", "PSNR brain", 2),
    ("ssim_brain", "SSIM brain", 3),
)


# A run of the paper's domain is scored first as the authors scored (8-bit slices, scikit-image's
# default SSIM), then mapped back per slice and scored per volume as "physical" runs are.
PAPER_METRICS = (
    ("psnr", "PSNR (dB)", 2),
    ("ssim", "SSIM", 3),
    ("lpips", "LPIPS", 3),
    ("psnr_physical", "PSNR per volume", 2),
    ("ssim_physical", "SSIM per volume", 3),
    ("psnr_brain", "PSNR brain", 2),
    ("ssim_brain", "SSIM brain", 3),
)

DOMAIN_NOTES = {
    "physical": "images normalised per volume to [0, 1].",
    "paper": "PSNR, SSIM (scikit-image's default 7×7 window) and LPIPS on each slice min–max "
    'scaled to 8 bits, as the paper; "per volume": the same outputs mapped back and normalised '
    "per volume, Gaussian-window SSIM.",
}
BRAIN_NOTE = '"brain" = inside the brain mask.'
NO_MASK_NOTE = (
    "The data root has no brain mask for every test patient (`masks/<patient>.nii.gz`), so "
    "there are no brain columns."
)


def has_brain_mask(results: dict) -> bool:
    """Whether a run's test slices had brain masks (older results: whether brain scores exist)."""
    return bool(results.get("brain_mask", "psnr_brain" in results["test"].get("sr", {})))


def _columns(results: dict) -> tuple:
    columns = PAPER_METRICS if results.get("domain", "physical") == "paper" else METRICS
    if has_brain_mask(results):
        return columns
    return tuple(c for c in columns if not c[0].endswith("_brain"))


def _scoring_note(results: dict) -> str:
    """What the numbers are: the domain's scoring, the brain mask, and which slices."""
    domain = results.get("domain", "physical")
    brain = BRAIN_NOTE if has_brain_mask(results) else NO_MASK_NOTE
    note = f"{DOMAIN_NOTES[domain]} {brain}"
    if "eval_slices" in results:
        note += f" Test slices: {results['eval_slices']}."
    return note


def run_summary(run_record: dict) -> str:
    """One paragraph on how a run was made, from its run.json (`run.record.write_run_record`)."""
    versions = run_record.get("versions", {})
    devices = run_record.get("devices", {})
    command = " ".join(run_record.get("command") or []) or "unknown"
    packages = ", ".join(f"{name} {v}" for name, v in versions.items() if v)
    return (
        f"Made by `{command}` (git commit {run_record.get('git_commit') or 'unknown'}) with "
        f"{packages or 'unknown package versions'}, on {devices.get('count', '?')} × "
        f"{devices.get('kind', 'unknown device')}; the full record is in run.json."
    )


def results_markdown(results: dict, run_record: dict | None = None) -> str:
    """The results of a run as a markdown table a person reads (mean ± std over test slices),
    ending with how the run was made when its run.json is given."""
    test = results["test"]
    columns = _columns(results)
    name = {"srcnn": "multi-scale SRCNN", "deepsr": "DeepSR"}.get(
        results["model"], results["model"]
    )
    scanner = results.get("degradation") == "scanner"
    task = f"scanner task: {results.get('task')}" if scanner else f"{results['scale']}×"
    target = (
        "; both scored against the same activity blurred by the target PSF, without noise"
        if scanner
        else ""
    )
    lines = [
        f"# {name}, {task} — test split",
        "",
        f"{count_of(test['num_slices'], 'slice')} of {count_of(test['num_patients'], 'patient')}; "
        f"mean ± std over slices; {_scoring_note(results)}{target}",
        "",
        "| image | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, label in (
        (
            "bicubic",
            "Input (scanner PSF + noise)"
            if scanner
            else f"Input LR ({results['scale']}× + bicubic)",
        ),
        ("sr", f"Output SR ({name})"),
    ):
        lines.append(
            f"| {label} | "
            + " | ".join(mean_std_cell(test[key], m, d) for m, _, d in columns)
            + " |"
        )
    if "lpips_unavailable" in test:
        lines += ["", f"LPIPS unavailable: {test['lpips_unavailable']}"]
    lines += [
        "",
        "Per patient (mean over slices):",
        "",
        "| patient | bicubic PSNR | SR PSNR | bicubic SSIM | SR SSIM |",
        "|---|---|---|---|---|",
    ]
    for pid, e in sorted(test.get("per_patient", {}).items()):
        lines.append(
            f"| {pid} | {e['bicubic']['psnr']:.2f} | {e['sr']['psnr']:.2f} | "
            f"{e['bicubic']['ssim']:.3f} | {e['sr']['ssim']:.3f} |"
        )
    lines += regional.summary_lines(results.get("regional"))
    lines += [
        "",
        f"Trained {results['step']} steps, scored with the "
        + (
            f"final weights (step {results['step']})"
            if results.get("weights") == "final"
            else f"best validation weights (step {results['best_step']})"
        )
        + f", {results['num_params']:,} parameters.",
    ]
    if run_record:
        lines += ["", run_summary(run_record)]
    return "\n".join(lines) + "\n"


def figure_slices(slices, count: int) -> np.ndarray:
    """Indices of up to `count` slices from different patients (each patient's middle slice)."""
    picks = []
    for pid in list(dict.fromkeys(slices.patient.tolist()))[:count]:
        idx = np.flatnonzero(slices.patient == pid)
        picks.append(int(idx[len(idx) // 2]))
    return np.array(picks, int)


# What the slices of a run's figures hold: each volume divided by its maximum (data.normalise).
VALUE_LABEL = "activity / volume max"


def comparison_figure(
    path: Path,
    hr,
    lr_up,
    sr,
    *,
    titles=("bicubic", "model", "original"),
    row_labels=None,
    error_map: bool = True,
    value_label: str = VALUE_LABEL,
) -> Path:
    """PNG grid: one row per slice, columns bicubic | model | original (| |model − original|).

    The three images of a row share one grey scale (0 to the original's maximum) and the error
    map has its own; each scale has a colour bar in a column of its own, labelled with
    `value_label`, so every image panel has the same size and the error map lines up with the
    others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = hr.shape[0]
    # image, image, image, colour bar (| error map, colour bar)
    ratios = [1, 1, 1, 0.06] + ([1, 0.06] if error_map else [])
    fig = plt.figure(figsize=(3 * (4 if error_map else 3) + 1.6, 3 * n), layout="constrained")
    grid = fig.add_gridspec(n, len(ratios), width_ratios=ratios)
    for i in range(n):
        vmax = float(hr[i].max()) or 1.0
        panels = [lr_up[i], sr[i], hr[i]]
        for j, img in enumerate(panels):
            ax = fig.add_subplot(grid[i, j])
            grey = ax.imshow(img, cmap="gray", vmin=0, vmax=vmax)
            ax.set_title(titles[j] if i == 0 else "")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i])
        fig.colorbar(grey, cax=fig.add_subplot(grid[i, 3]), label=value_label)
        if error_map:
            err = np.abs(sr[i] - hr[i])
            ax = fig.add_subplot(grid[i, 4])
            im = ax.imshow(err, cmap="magma", vmin=0, vmax=max(float(err.max()), 1e-6))
            ax.set_title("|model − original|" if i == 0 else "")
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, cax=fig.add_subplot(grid[i, 5]), label=f"|error|, {value_label}")
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scalar name → (steps, values) from a run's metrics.jsonl.

    A resumed run logs again the steps after its last checkpoint; the later entry of a step wins.
    Entries that are not numbers (notes on what a scalar measures) are left out.
    """
    by_name: dict[str, dict[int, float]] = {}
    path = Path(path)
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short when a run was killed mid-write
            continue
        step = int(record.pop("step"))
        for name, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                by_name.setdefault(name, {})[step] = float(value)
    return {
        name: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
        for name, points in by_name.items()
    }


# Fewer logged losses than this are drawn as they are; more are smoothed (`smoothed_loss`).
MIN_POINTS_TO_SMOOTH = 8


def smoothed_loss(values) -> np.ndarray:
    """An exponential moving average of logged losses, over about the last 8 of them (a fifth
    of a longer run's).

    Each logged loss is one batch's, so consecutive points zig-zag by more than the trend
    between them. The average is taken of the logarithms (the curve is drawn on a log axis,
    where a spike would otherwise outweigh the steady points) and corrected for its start at
    zero, as TensorBoard's smoothing is, so the first points are not pulled down.
    """
    values = np.asarray(values, np.float64)
    span = max(8, len(values) // 5)
    decay = 1 - 2 / (span + 1)
    logs = np.log(np.maximum(values, np.finfo(np.float64).tiny))
    average, out = 0.0, np.empty_like(logs)
    for t, value in enumerate(logs):
        average = decay * average + (1 - decay) * value
        out[t] = average / (1 - decay ** (t + 1))
    return np.exp(out)


def training_curves_figure(runs):
    """Train loss and validation PSNR against step, one line per `(label, workdir)` in `runs`,
    from each workdir's metrics.jsonl; the validation bicubic PSNR as a dashed line. A loss
    logged at `MIN_POINTS_TO_SMOOTH` steps or more is drawn smoothed (`smoothed_loss`), with
    the logged values as a faint line behind it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_psnr = fig.subplots(1, 2)
    baseline = None
    smoothed = False
    for label, workdir in runs:
        curves = read_metrics(Path(workdir) / layout.METRICS)
        if "train/loss" in curves:
            steps, loss = curves["train/loss"]
            if len(loss) >= MIN_POINTS_TO_SMOOTH:
                (raw,) = ax_loss.plot(steps, loss, alpha=0.25, linewidth=0.8, label="_logged")
                ax_loss.plot(steps, smoothed_loss(loss), color=raw.get_color(), label=label)
                smoothed = True
            else:
                ax_loss.plot(steps, loss, label=label)
        if "val/sr/psnr" in curves:
            ax_psnr.plot(*curves["val/sr/psnr"], marker=".", label=label)
        if "val/bicubic/psnr" in curves:
            baseline = float(np.mean(curves["val/bicubic/psnr"][1]))
    if baseline is not None and math.isfinite(baseline):
        ax_psnr.axhline(baseline, color="black", linestyle="--", label="bicubic")
    ax_loss.set_yscale("log")
    ax_loss.set(
        xlabel="step",
        ylabel="train loss (MSE of activity / volume max)",
        title="training loss" + (" (smoothed; faint: as logged)" if smoothed else ""),
    )
    ax_psnr.set(xlabel="step", ylabel="val PSNR (dB)", title="validation PSNR")
    for ax in (ax_loss, ax_psnr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_run_outputs(
    workdir: Path, config, results: dict, params, test_set, *, model, task, mesh, scores: dict
) -> None:
    """results.json, results.md, per-slice scores, the test-slice figure and the training
    curves of a finished run."""
    picks = figure_slices(test_set, config.eval.num_figure_slices)
    hr = np.asarray(test_set.hr[picks], np.float32)
    guide = None if test_set.guide is None else np.asarray(test_set.guide[picks], np.float32)
    context = None if test_set.context is None else np.asarray(test_set.context[picks])
    lr_up, sr, target = predict_slices(
        params, hr, model=model, task=task, mesh=mesh, guide=guide, context=context
    )
    labels = [f"{test_set.patient[i]} z={test_set.slice_index[i]}" for i in picks]
    # The "original" column is what the output is scored against (the task's target).
    comparison_figure(workdir / layout.TEST_FIGURE, target, lr_up, sr, row_labels=labels)
    per_slice = {
        "patient": test_set.patient.tolist(),
        "slice_index": [int(i) for i in test_set.slice_index],
        **{k: np.asarray(v).tolist() for k, v in scores.items() if isinstance(v, np.ndarray)},
    }
    write_json_atomic(workdir / layout.TEST_SCORES, per_slice)
    label = f"{config.model.name} {config.scale}×"
    save_figure_atomic(training_curves_figure([(label, workdir)]), workdir / layout.CURVES)
    results = {
        **results,
        "figure": layout.TEST_FIGURE,
        "curves": layout.CURVES,
        "run_record": layout.RUN_RECORD,
    }
    write_json_atomic(workdir / layout.RESULTS, results)
    try:
        run_record = layout.read_record(workdir, layout.RUN_RECORD)
    except layout.WorkdirError:
        run_record = None  # results.md without how the run was made, rather than no results
    write_atomic(workdir / layout.RESULTS_MD, results_markdown(results, run_record).encode())
