"""What a finished run leaves for people: results.json, results.md and a comparison figure.

Every file goes through `petsr_jax.files`, so an interruption never leaves a half-written result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from petsr_jax.evaluation.predict import predict_slices
from petsr_jax.files import save_figure_atomic, write_atomic, write_json_atomic


def _fmt(entry: dict, metric: str, digits: int) -> str:
    if metric not in entry:
        return "n/a"
    return f"{entry[metric]:.{digits}f} ± {entry[metric + '_std']:.{digits}f}"


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
    "physical": 'images normalised per volume to [0, 1]; "brain" = inside the brain mask.',
    "paper": "PSNR, SSIM (scikit-image's default 7×7 window) and LPIPS on each slice min–max "
    'scaled to 8 bits, as the paper; "per volume" and "brain" (inside the brain mask): the '
    "same outputs mapped back and normalised per volume, Gaussian-window SSIM.",
}


def results_markdown(results: dict) -> str:
    """The results of a run as a markdown table a person reads (mean ± std over test slices)."""
    test = results["test"]
    domain = results.get("domain", "physical")
    columns = PAPER_METRICS if domain == "paper" else METRICS
    name = {"srcnn": "multi-scale SRCNN", "deepsr": "DeepSR"}.get(
        results["model"], results["model"]
    )
    lines = [
        f"# {name}, {results['scale']}× — test split",
        "",
        f"{test['num_slices']} slices of {test['num_patients']} patients; mean ± std over slices; "
        + DOMAIN_NOTES[domain],
        "",
        "| image | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, label in (
        ("bicubic", f"Input LR ({results['scale']}× + bicubic)"),
        ("sr", f"Output SR ({name})"),
    ):
        lines.append(
            f"| {label} | " + " | ".join(_fmt(test[key], m, d) for m, _, d in columns) + " |"
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
    return "\n".join(lines) + "\n"


def figure_slices(slices, count: int) -> np.ndarray:
    """Indices of up to `count` slices from different patients (each patient's middle slice)."""
    picks = []
    for pid in list(dict.fromkeys(slices.patient.tolist()))[:count]:
        idx = np.flatnonzero(slices.patient == pid)
        picks.append(int(idx[len(idx) // 2]))
    return np.array(picks, int)


def comparison_figure(
    path: Path,
    hr,
    lr_up,
    sr,
    *,
    titles=("bicubic", "model", "original"),
    row_labels=None,
    error_map: bool = True,
) -> Path:
    """PNG grid: one row per slice, columns bicubic | model | original (| |model − original|)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = hr.shape[0]
    cols = 4 if error_map else 3
    fig, axes = plt.subplots(n, cols, figsize=(3 * cols, 3 * n), squeeze=False)
    for i in range(n):
        vmax = float(hr[i].max()) or 1.0
        panels = [lr_up[i], sr[i], hr[i]]
        for j, img in enumerate(panels):
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=vmax)
            axes[i, j].set_title(titles[j] if i == 0 else "")
        if error_map:
            err = np.abs(sr[i] - hr[i])
            im = axes[i, 3].imshow(err, cmap="magma", vmin=0, vmax=max(float(err.max()), 1e-6))
            axes[i, 3].set_title("|model − original|" if i == 0 else "")
            fig.colorbar(im, ax=axes[i, 3], fraction=0.046)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i])
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return path


def write_run_outputs(
    workdir: Path, config, results: dict, params, test_set, *, model, mesh, scores: dict
) -> None:
    """results.json, results.md, per-slice scores and the test-slice figure of a finished run."""
    picks = figure_slices(test_set, config.eval.num_figure_slices)
    hr = np.asarray(test_set.hr[picks], np.float32)
    lr_up, sr = predict_slices(
        params, hr, model=model, scale=config.scale, mesh=mesh, domain=config.data.domain
    )
    labels = [f"{test_set.patient[i]} z={test_set.slice_index[i]}" for i in picks]
    comparison_figure(workdir / "test_slices.png", hr, lr_up, sr, row_labels=labels)
    per_slice = {
        "patient": test_set.patient.tolist(),
        "slice_index": [int(i) for i in test_set.slice_index],
        **{k: np.asarray(v).tolist() for k, v in scores.items() if isinstance(v, np.ndarray)},
    }
    write_json_atomic(workdir / "test_scores.json", per_slice)
    results = {**results, "figure": "test_slices.png"}
    write_json_atomic(workdir / "results.json", results)
    write_atomic(workdir / "results.md", results_markdown(results).encode())
