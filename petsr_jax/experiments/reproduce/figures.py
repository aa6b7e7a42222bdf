"""The reproduction's figures: Figures 2–4 (bicubic | SRCNN | DeepSR | original) and Figure 5.

The figures come from the params each run scored (its final weights), loaded as a user would
(`petsr_jax.inference.load`): Figures 2–4 degrade the test slices and recover them
(`reconstruct`), Figure 5 applies the networks to the original slices as they are (`enhance`),
beside the T1 MR. Every grid is `petsr_jax.evaluation.report.image_grid`'s, as the run's own
figures are.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from petsr_jax import data
from petsr_jax.evaluation import report
from petsr_jax.evaluation.report import GridColumn, image_grid
from petsr_jax.experiments.reproduce.runs import ReproduceError, read_record
from petsr_jax.run import layout

FIGURE_NUMBER = {8: 2, 12: 3, 16: 4}
ENHANCEMENT_SCALE = 8  # the paper's Figure 5 applies the 8×-trained models
ENHANCEMENT_FIGURE = "figure5_enhancement.png"


@dataclasses.dataclass
class FigureSlices:
    """The test slices a scale's figures show: one per test patient (its middle brain slice)."""

    root: Path
    hr: np.ndarray  # float32 [N, H, W], normalised as in evaluation
    patient: list[str]
    slice_index: list[int]

    @property
    def labels(self) -> list[str]:
        return [f"{p} z={z}" for p, z in zip(self.patient, self.slice_index, strict=True)]


def figure_slices(config, workdir: Path) -> FigureSlices:
    """Up to `eval.num_figure_slices` test slices of different patients of a run's test split."""
    root = data.resolve_root(config)
    split = read_record(workdir, layout.SPLIT)
    test_set = data.build_slice_set(
        root, split["test"], eval_split=True, rule=config.data.eval_slices
    )
    picks = report.figure_slices(test_set, config.eval.num_figure_slices)
    return FigureSlices(
        root,
        np.asarray(test_set.hr[picks], np.float32),
        [str(test_set.patient[i]) for i in picks],
        [int(test_set.slice_index[i]) for i in picks],
    )


def comparison_panels(srcnn, deepsr, hr: np.ndarray) -> dict[str, np.ndarray]:
    """Figures 2–4's columns for [N, H, W] slices: bicubic, SRCNN, DeepSR, original.

    Each model degrades the slices itself (the one `degrade()` at its scale); the two degraded
    inputs must be the same image, or the figure would compare the models on different inputs.
    """
    if srcnn.scale != deepsr.scale:
        raise ReproduceError(f"SRCNN is {srcnn.scale}× but DeepSR is {deepsr.scale}×")
    bicubic, srcnn_out = srcnn.reconstruct_normalised(hr)
    bicubic_deepsr, deepsr_out = deepsr.reconstruct_normalised(hr)
    if not np.allclose(bicubic, bicubic_deepsr, rtol=0, atol=1e-6):
        raise ReproduceError(
            f"the {srcnn.scale}× bicubic inputs of {srcnn.workdir} and {deepsr.workdir} differ"
        )
    return {"bicubic": bicubic, "srcnn": srcnn_out, "deepsr": deepsr_out, "original": hr}


def enhancement_panels(srcnn, deepsr, slices: FigureSlices) -> dict[str, object]:
    """Figure 5's columns: the original, each model applied to it as it is, and the T1 MR.

    `t1` is a list holding each slice's T1 MR (None where the patient has no `t1/` map).
    """
    t1_volumes = {}
    patients = data.list_patients(slices.root)
    for pid in dict.fromkeys(slices.patient):
        t1_volumes[pid] = data.load_patient(slices.root, pid, patients[pid]).t1
    t1 = [
        None if t1_volumes[p] is None else np.asarray(t1_volumes[p][z], np.float32)
        for p, z in zip(slices.patient, slices.slice_index, strict=True)
    ]
    return {
        "original": slices.hr,
        "srcnn": srcnn.enhance_normalised(slices.hr),
        "deepsr": deepsr.enhance_normalised(slices.hr),
        "t1": t1,
    }


def scale_figure(scale: int, models: dict, slices: FigureSlices, path: Path) -> dict:
    """Figures 2–4: the same test slices, bicubic | SRCNN | DeepSR | original."""
    panels = comparison_panels(models[("srcnn", scale)], models[("deepsr", scale)], slices.hr)
    columns = [
        GridColumn(f"{scale}× + bicubic", panels["bicubic"]),
        GridColumn("SRCNN", panels["srcnn"]),
        GridColumn("DeepSR", panels["deepsr"]),
        GridColumn("original", panels["original"]),
    ]
    shape = image_grid(path, columns, slices.labels)
    return {"path": path.name, "rows": shape[0], "cols": shape[1], "slices": slices.labels}


def enhancement_figure(scale: int, models: dict, slices: FigureSlices, path: Path) -> dict:
    """Figure 5: original | SRCNN(original) | DeepSR(original) | T1 MR of the same slice."""
    panels = enhancement_panels(models[("srcnn", scale)], models[("deepsr", scale)], slices)
    columns = [
        GridColumn("original (input)", panels["original"]),
        GridColumn(f"SRCNN ({scale}× model)", panels["srcnn"]),
        GridColumn(f"DeepSR ({scale}× model)", panels["deepsr"]),
        GridColumn("T1 MR", panels["t1"], "mr"),
    ]
    shape = image_grid(path, columns, slices.labels)
    return {
        "path": path.name,
        "rows": shape[0],
        "cols": shape[1],
        "slices": slices.labels,
        "scale": scale,
        "has_t1": [x is not None for x in panels["t1"]],
    }


def figure_name(scale: int) -> str:
    number = FIGURE_NUMBER.get(scale)
    return f"figure{number}_x{scale}.png" if number else f"figure_x{scale}.png"


def write_figures(scales, configs: dict, records: dict, models: dict, out_dir: Path):
    """Figures 2–4 of every scale and Figure 5 into `out_dir`; returns what each shows.

    Figure 5 uses the 8× models (`ENHANCEMENT_SCALE`) as the paper does, or the smallest scale
    run where there is no 8× run. `models`: (name, scale) → the run's loaded `SuperResolver`.
    """
    figures = {}
    for scale in scales:
        slices = figure_slices(configs[("srcnn", scale)], records[("srcnn", scale)].workdir)
        figures[scale] = scale_figure(scale, models, slices, out_dir / figure_name(scale))
    scale = ENHANCEMENT_SCALE if ENHANCEMENT_SCALE in scales else min(scales)
    slices = figure_slices(configs[("srcnn", scale)], records[("srcnn", scale)].workdir)
    enhancement = enhancement_figure(scale, models, slices, out_dir / ENHANCEMENT_FIGURE)
    return figures, enhancement
