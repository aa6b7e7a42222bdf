"""What a finished run leaves for people: results.json, results.md and figures (the test
slices side by side, and training curves from metrics.jsonl, shared with the ablations).

Every file goes through `petsr_jax.io.files`, so an interruption never leaves a half-written
result; the files' names are `petsr_jax.run.layout`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from petsr_jax.data.domain import Domain
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
    """The lines of a markdown table: the header, its rule, one line per row; a `|` inside a
    cell (as in "|mean err|") is escaped so it does not end the cell."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]


# What the tables call the networks (`model.name`).
MODEL_NAMES = {"srcnn": "multi-scale SRCNN", "deepsr": "DeepSR"}

# Every score a table of the project shows: results key → (column header, decimals). One
# header per score, so results.md, the reproduction's tables and the MR comparison agree.
SCORES = {
    "psnr": ("PSNR (dB)", 2),
    "ssim": ("SSIM", 3),
    "lpips": ("LPIPS", 3),
    "psnr_physical": ("PSNR per volume", 2),
    "ssim_physical": ("SSIM per volume", 3),
    "psnr_brain": ("PSNR brain", 2),
    "ssim_brain": ("SSIM brain", 3),
}


def score_columns(*keys: str) -> tuple[tuple[str, str, int], ...]:
    """(key, header, decimals) of the scores `keys` name, in that order: a table's columns."""
    return tuple((key, *SCORES[key]) for key in keys)


METRICS = score_columns("psnr", "ssim", "lpips", "psnr_brain", "ssim_brain")
# A run of the paper's domain is scored first as the authors scored (8-bit slices, scikit-image's
# default SSIM), then mapped back per slice and scored per volume as "physical" runs are.
PAPER_METRICS = score_columns(
    "psnr", "ssim", "lpips", "psnr_physical", "ssim_physical", "psnr_brain", "ssim_brain"
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


def _domain(results: dict) -> Domain:
    """The domain a run was scored in (results written before it was recorded: "physical")."""
    return Domain.of(results.get("domain", Domain().name))


def _columns(results: dict) -> tuple:
    columns = PAPER_METRICS if _domain(results).eight_bit else METRICS
    if has_brain_mask(results):
        return columns
    return tuple(c for c in columns if not c[0].endswith("_brain"))


def _scoring_note(results: dict) -> str:
    """What the numbers are: the domain's scoring, the brain mask, and which slices."""
    brain = BRAIN_NOTE if has_brain_mask(results) else NO_MASK_NOTE
    note = f"{DOMAIN_NOTES[_domain(results).name]} {brain}"
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
    name = MODEL_NAMES.get(results["model"], results["model"])
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


@dataclasses.dataclass(frozen=True)
class GridColumn:
    """One column of an `image_grid`: its title and one image per row, shown as `kind` says.

    - "shared": activity on the row's one grey scale, from 0 to the brightest "shared" panel of
      the row (or to the grid's `reference` column), so the columns of a row compare by eye;
    - "error": an error map on its own scale, 0 to its maximum, in magma;
    - "mr": an MR image on its own grey scale, its 1st to 99.5th percentile (MR units are
      arbitrary); an image that is None draws an empty panel saying the slice has no MR.
    """

    title: str
    images: Sequence
    kind: str = "shared"


def image_grid(
    path: Path,
    columns: Sequence[GridColumn],
    row_labels: Sequence[str] | None = None,
    *,
    reference: int | None = None,
    value_label: str | None = None,
    outlines: Sequence | None = None,
) -> tuple[int, int]:
    """PNG grid of 3-inch panels, one row per slice, one column per `GridColumn`; returns
    (rows, columns). Every figure of slices side by side is drawn here, so they read alike.

    `reference`: the index of the column whose maximum sets each row's shared grey scale (the
    original, which the others are judged against); None takes the row's brightest shared
    panel. `value_label`: each scale gets a colour bar labelled with it, in a column of its own
    (the shared scale's after the last shared column, an error map's after it), so every image
    panel has the same size; without it there are no colour bars. `outlines`: one boolean mask
    per row, outlined in red on each of the row's panels (lesions), or None for none.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = [j for j, column in enumerate(columns) if column.kind == "shared"]
    # Grid columns: each image, and with value_label a narrow colour bar after the last shared
    # column and after each error map.
    layout_columns: list[tuple[str, int]] = []
    for j, column in enumerate(columns):
        layout_columns.append(("image", j))
        if value_label and (column.kind == "error" or (shared and j == shared[-1])):
            layout_columns.append(("bar", j))
    ratios = [1 if what == "image" else 0.06 for what, _ in layout_columns]
    n = len(columns[0].images)
    width = 3 * len(columns) + (1.6 if len(ratios) > len(columns) else 0)
    fig = plt.figure(figsize=(width, 3 * n), layout="constrained")
    grid = fig.add_gridspec(n, len(ratios), width_ratios=ratios)
    for i in range(n):
        scale_from = shared if reference is None else [reference]
        vmax = max((float(np.max(columns[j].images[i])) for j in scale_from), default=0.0)
        drawn = {}
        for g, (what, j) in enumerate(layout_columns):
            column = columns[j]
            if what == "bar":
                label = value_label if column.kind == "shared" else f"|error|, {value_label}"
                fig.colorbar(drawn[j], cax=fig.add_subplot(grid[i, g]), label=label)
                continue
            ax = fig.add_subplot(grid[i, g])
            drawn[j] = _draw_panel(ax, column.images[i], column.kind, vmax or 1.0)
            if outlines is not None and np.any(outlines[i]):
                ax.contour(outlines[i], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(column.title if i == 0 else "")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i])
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return n, len(columns)


def _draw_panel(ax, image, kind: str, vmax: float):
    """One panel of `image_grid`; returns what a colour bar of it is drawn from."""
    if kind == "shared":
        return ax.imshow(image, cmap="gray", vmin=0, vmax=vmax)
    if kind == "error":
        return ax.imshow(image, cmap="magma", vmin=0, vmax=max(float(np.max(image)), 1e-6))
    if kind != "mr":
        raise ValueError(f"GridColumn.kind: expected shared, error or mr, got {kind!r}")
    if image is None:
        ax.text(0.5, 0.5, "no T1 MR", ha="center", va="center", transform=ax.transAxes)
        return None
    low, high = np.percentile(image, (1, 99.5))
    return ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)


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
    columns = [GridColumn(titles[j], images) for j, images in enumerate((lr_up, sr, hr))]
    if error_map:
        columns.append(GridColumn("|model − original|", np.abs(sr - hr), "error"))
    image_grid(path, columns, row_labels, reference=2, value_label=value_label)
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
