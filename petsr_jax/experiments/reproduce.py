"""The paper's results in one call: Tables 1–3, Figures 2–5 and a report, from ten runs.

`reproduce(scales=(8, 12, 16), quick=False)` trains multi-scale SRCNN and DeepSR at every scale,
plus at 8× DeepSR with the paper text's image-level skip beside the authors' feature-level one,
and at every scale the MR-guided DeepSR (the `mr` flag: PET plus the co-registered T1), the
paper's future work (or reuses their finished workdirs: `train.train_and_evaluate` skips a
finished run and resumes an interrupted one). Every run is of the paper's domain and protocol
(the `paper` config flag: each slice min–max scaled to 8 bits, PIL-style 8-bit degradation,
batch 16, no flips, final weights), so the tables are scored as the authors scored theirs. It
then writes into the output folder:

    table{1,2,3}_x{8,12,16}.md   rows "Input LR (N× + bicubic)", "Output SR from multi-scale
                                 SRCNN", "Output SR from DeepSR" (and at 8× the image-skip
                                 DeepSR); PSNR, SSIM (scikit-image's default window), LPIPS as
                                 mean ± std over test slices, the paper's published numbers
                                 beside them; then a second table of the same outputs mapped back
                                 to each volume's own scale (whole slice and brain), and at 8×
                                 the regional recovery of grey matter and lesions
    figure{2,3,4}_x{8,12,16}.png test slices of different patients: bicubic | SRCNN | DeepSR |
                                 original (the same slices for both models)
    mr_comparison_x{8,12,16}.*   PET-only vs MR-guided DeepSR: PSNR / SSIM whole and brain,
                                 grey-matter and lesion activity errors (.md, .json, also in the
                                 table file), and test slices with a lesion: PET-only |
                                 MR-guided | original | T1 (.png)
    figure5_enhancement.png      original slice | SRCNN(original) | DeepSR(original) | T1 MR, with
                                 the 8× models applied to the undegraded image
    results.json                 every number of the tables, the runs and the settings
    report.md                    tables, figures, commands, run times and settings

The bicubic row of a table is measured once per run, by the SRCNN run and by the DeepSR run of
the same scale; both share the test split and the one `degrade()`, so the two measurements must
agree. `reproduce` checks that they do and stops with `ReproduceError` otherwise: a mismatch means
the runs did not see the same test data, and no table built from them would be a comparison.

The figures come from the params each run scored (its final weights), loaded as a user would
(`petsr_jax.inference.load`): Figures 2–4 degrade the test slices and recover them
(`reconstruct`), Figure 5 applies the networks to the original slices as they are (`enhance`).

Each run lives in `<runs>/<model>_x<scale>[_quick][_tiny][_<hash of key=value overrides>]`, so a
quick run never answers for a full one. A workdir whose `config.json` differs from the config
asked for in a field that changes results is refused rather than silently reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from petsr_jax import data, train
from petsr_jax.config import FLAGS, build_config, validate
from petsr_jax.evaluation import report
from petsr_jax.evaluation.report import count_of
from petsr_jax.experiments import mr_guidance
from petsr_jax.io import files
from petsr_jax.run import identity, layout
from petsr_jax.run.lock import WorkdirLock

log = logging.getLogger(__name__)

MODELS = ("srcnn", "deepsr")
PAPER_SCALES = (8, 12, 16)
TABLE_NUMBER = {8: 1, 12: 2, 16: 3}
FIGURE_NUMBER = {8: 2, 12: 3, 16: 4}
ENHANCEMENT_SCALE = 8  # the paper's Figure 5 applies the 8×-trained models

# The runs beside the two models: name → (model, config overrides, scales it runs at). The paper's
# text describes an input→output skip; the authors' code (and the default) skips at feature level.
# MR-guided DeepSR (the paper's future work: the co-registered T1 as a second input channel)
# runs at every paper scale, beside the PET-only DeepSR of the same protocol.
VARIANTS = {
    "deepsr_image": ("deepsr", "model.global_skip=image", (8,)),
    "deepsr_mr": ("deepsr", "mr", PAPER_SCALES),
}
MODEL_ROW = {
    "srcnn": "Output SR from multi-scale SRCNN",
    "deepsr": "Output SR from DeepSR",
    "deepsr_image": "Output SR from DeepSR, image-level skip (paper text)",
    "deepsr_mr": "Output SR from MR-guided DeepSR (PET + T1)",
}
MODEL_SHORT = {
    "srcnn": "SRCNN",
    "deepsr": "DeepSR",
    "deepsr_image": "DeepSR (image skip)",
    "deepsr_mr": "DeepSR + T1",
}
METRICS = (("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3), ("lpips", "LPIPS", 3))
# The same outputs mapped back per slice and scored per volume (petsr_jax.evaluation.evaluate).
PHYSICAL_METRICS = (
    ("psnr_physical", "PSNR (dB)", 2),
    ("ssim_physical", "SSIM", 3),
    ("psnr_brain", "PSNR brain", 2),
    ("ssim_brain", "SSIM brain", 3),
)

# Özaltan et al., Tables 1–3: averages over 441 test slices of 9 patients of their private
# 33-patient Signa PET/MR dataset. Kept as the published strings (Table 3 prints 3 decimals).
PAPER_TABLES = {
    8: {
        "bicubic": ("30.53", "0.889", "0.152"),
        "srcnn": ("32.66", "0.926", "0.119"),
        "deepsr": ("33.63", "0.936", "0.108"),
    },
    12: {
        "bicubic": ("25.97", "0.796", "0.271"),
        "srcnn": ("26.71", "0.822", "0.246"),
        "deepsr": ("27.46", "0.861", "0.182"),
    },
    16: {
        "bicubic": ("22.799", "0.699", "0.356"),
        "srcnn": ("23.433", "0.714", "0.343"),
        "deepsr": ("24.118", "0.774", "0.266"),
    },
}
PAPER_SOURCE = (
    "published averages of Özaltan et al. (Tables 1–3) over 441 test slices of 9 patients of "
    "their private 33-patient GE Signa PET/MR dataset; a different dataset, shown for reference"
)

# Relative tolerance for "the two bicubic measurements agree". A different test set or
# degradation moves PSNR by tenths of a dB; float reassociation between two compilations by
# ~1e-7. The tables print 0.01 dB.
BICUBIC_RTOL = 1e-5


class ReproduceError(RuntimeError):
    """The runs cannot make the paper's tables; the message names the workdir and the field."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `reproduce` runs and where it writes.

    Attributes:
      scales: downscaling factors, one table and one figure each (the paper: 8, 12, 16).
      quick: each config's `quick` flag (small cohort, short training: a 2-core CPU in ~1 h).
      config_arg: further config arg for both models, e.g. `"tiny,train.epochs=2"`; it may not
        set `scale` (that is `scales`).
      runs_dir: parent of the six workdirs.
      out_dir: where tables, figures and report.md go.
    """

    scales: tuple[int, ...] = PAPER_SCALES
    quick: bool = False
    config_arg: str = ""
    runs_dir: Path = Path("runs")
    out_dir: Path = Path("reports/paper")

    def model_arg(self, scale: int, variant: str | None = None) -> str:
        """The config arg of one run: `paper`, `quick`, the user's arg, the variant's overrides,
        then the scale."""
        tokens = ["paper"] + (["quick"] if self.quick else []) + _tokens(self.config_arg)
        if variant in VARIANTS:
            tokens += _tokens(VARIANTS[variant][1])
        return ",".join(tokens + [f"scale={scale}"])

    def command(self) -> str:
        """The `launch/reproduce.py` command line that runs these settings."""
        parts = ["python", "launch/reproduce.py"]
        if self.quick:
            parts.append("--quick")
        parts += [
            f"--scales={','.join(str(s) for s in self.scales)}",
            f"--runs={self.runs_dir}",
            f"--out={self.out_dir}",
        ]
        if self.config_arg:
            parts.append(f"--config_arg={self.config_arg}")
        return shlex.join(parts)


def _tokens(arg: str) -> list[str]:
    return [t.strip() for t in (arg or "").split(",") if t.strip()]


def run_name(model: str, scale: int, settings: Settings) -> str:
    """`<model>_x<scale>`, then the config flags, then a hash of any `key=value` overrides.

    The name separates protocols (full, quick, tiny, other overrides), so `reproduce` with one
    protocol never reuses a run of another; the hash keeps names short when overrides name long
    paths, and is stable across processes (unlike `hash()`).
    """
    tokens = ["paper"] + (["quick"] if settings.quick else []) + _tokens(settings.config_arg)
    flags = sorted({t for t in tokens if "=" not in t})
    overrides = sorted(t for t in tokens if "=" in t)
    name = f"{model}_x{scale}" + "".join(f"_{f}" for f in flags)
    if overrides:
        name += "_" + hashlib.sha1(",".join(overrides).encode()).hexdigest()[:8]
    return name


def build_configs(settings: Settings) -> dict[tuple[str, int], object]:
    """(model, scale) → validated, locked config; every problem reported before any training."""
    if not settings.scales:
        raise ReproduceError("scales: expected at least one downscaling factor, e.g. 8,12,16")
    if len(set(settings.scales)) != len(settings.scales):
        raise ReproduceError(f"scales: {settings.scales} names a scale twice")
    for token in _tokens(settings.config_arg):
        key = token.split("=", 1)[0].strip()
        if "=" in token and key == "scale":
            raise ReproduceError(
                f"config_arg {settings.config_arg!r} sets scale; give the scales with --scales"
            )
        if "=" not in token and token not in FLAGS:
            raise ReproduceError(
                f"config_arg {settings.config_arg!r}: unknown flag {token!r}; flags: "
                f"{', '.join(sorted(FLAGS))}"
            )
    configs = {}
    for scale in settings.scales:
        names = list(MODELS) + [v for v, (_, _, scales) in VARIANTS.items() if scale in scales]
        for name in names:
            try:
                config = build_config(model_of(name), settings.model_arg(scale, name))
                validate(config)
            except (KeyError, ValueError) as e:
                raise ReproduceError(f"{name} at {scale}×: {e}") from e
            configs[(name, scale)] = config
    return configs


def model_of(name: str) -> str:
    """The model a run name trains ("deepsr_image" → "deepsr")."""
    return VARIANTS[name][0] if name in VARIANTS else name


@dataclasses.dataclass
class RunRecord:
    """One run as `reproduce` found and left it."""

    model: str
    scale: int
    workdir: Path
    status: str  # "reused" (finished before), "trained" (from scratch) or "resumed"
    wall_s: float  # seconds spent in train_and_evaluate by this call
    results: dict

    def main_command(self, settings: Settings) -> str:
        """The `launch/main.py` command that trains this run alone."""
        return shlex.join(
            [
                "python",
                "launch/main.py",
                f"--config=configs/{model_of(self.model)}.py:"
                f"{settings.model_arg(self.scale, self.model)}",
                f"--workdir={self.workdir}",
            ]
        )


def run_all(settings: Settings, configs: dict, *, progress: bool = True) -> dict:
    """(model, scale) → `RunRecord`: train what is missing, resume what was cut, reuse the rest."""
    workdirs = {
        key: (Path(settings.runs_dir) / run_name(*key, settings)).absolute() for key in configs
    }
    # Every workdir is checked before the first run starts, so a refusal costs no training.
    for key, config in configs.items():
        try:
            identity.check_same_run(
                workdirs[key], config, remedy="Give another --runs folder for these settings"
            )
        except layout.WorkdirError as error:
            raise ReproduceError(str(error)) from None
    records = {}
    for (model, scale), config in configs.items():
        workdir = workdirs[(model, scale)]
        results_path = workdir / layout.RESULTS
        before = results_path.stat().st_mtime_ns if results_path.exists() else None
        checkpoints = workdir / layout.CHECKPOINTS
        resumable = checkpoints.is_dir() and any(checkpoints.iterdir())
        t0 = time.perf_counter()
        results = train.train_and_evaluate(config, workdir, progress=progress)
        wall = time.perf_counter() - t0
        after = results_path.stat().st_mtime_ns if results_path.exists() else None
        if before is not None and before == after:
            status = "reused"
        else:
            status = "resumed" if resumable else "trained"
        log.info("%s %d×: %s in %.1f s (%s)", model, scale, status, wall, workdir)
        records[(model, scale)] = RunRecord(model, scale, workdir, status, wall, results)
    return records


def _read_record(workdir: Path, name: str) -> dict:
    """A record of a finished run (`layout.read_record`); one that is absent is an error here."""
    try:
        record = layout.read_record(workdir, name)
    except layout.WorkdirError as e:
        raise ReproduceError(f"cannot read {e}") from None
    if record is None:
        raise ReproduceError(f"cannot read {Path(workdir) / name}: no such file")
    return record


def check_bicubic_agrees(srcnn: RunRecord, deepsr: RunRecord) -> None:
    """The two runs of a scale measured the same bicubic baseline, slice by slice.

    Compares the test slices (patient, slice index) and every per-slice bicubic score of
    `test_scores.json`, then the summary of `results.json`; raises `ReproduceError` naming both
    workdirs and the first disagreement.
    """
    where = f"{srcnn.workdir} and {deepsr.workdir}"
    split_a, split_b = (_read_record(r.workdir, layout.SPLIT) for r in (srcnn, deepsr))
    if split_a.get("test") != split_b.get("test"):
        raise ReproduceError(
            f"{where} have different test patients ({split_a.get('test')} vs "
            f"{split_b.get('test')}); the tables need both models on the same test split"
        )
    scores_a, scores_b = (_read_record(r.workdir, layout.TEST_SCORES) for r in (srcnn, deepsr))
    for key in ("patient", "slice_index"):
        if scores_a.get(key) != scores_b.get(key):
            raise ReproduceError(f"{where}: the test slices differ ({key} lists disagree)")
    keys = sorted(k for k in set(scores_a) | set(scores_b) if k.startswith("bicubic/"))
    for key in keys:
        if key not in scores_a or key not in scores_b:
            continue  # LPIPS computed by one run only: nothing to compare
        a, b = np.asarray(scores_a[key], float), np.asarray(scores_b[key], float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=BICUBIC_RTOL, atol=0):
            worst = int(np.argmax(np.abs(a - b))) if a.shape == b.shape else 0
            raise ReproduceError(
                f"bicubic {key.split('/')[1]} differs between {where} (slice {worst}: "
                f"{a.flat[worst]!r} vs {b.flat[worst]!r}); both runs must degrade the same "
                "test slices with the same degrade(). Retrain one of them in a fresh workdir."
            )
    summary_a, summary_b = srcnn.results["test"]["bicubic"], deepsr.results["test"]["bicubic"]
    for metric in sorted(set(summary_a) & set(summary_b)):
        if not np.isclose(summary_a[metric], summary_b[metric], rtol=BICUBIC_RTOL, atol=0):
            raise ReproduceError(
                f"bicubic {metric} in results.json differs between {where}: "
                f"{summary_a[metric]!r} vs {summary_b[metric]!r}"
            )


def lpips_note(config, test: dict) -> str | None:
    """Why a run's results hold no LPIPS (None when they do)."""
    if "lpips" in test.get("sr", {}):
        return None
    if not config.eval.lpips:
        return "not computed: eval.lpips=false"
    return test.get("lpips_unavailable", "LPIPS unavailable")


def table_rows(scale: int, records: dict, configs: dict, metrics: tuple = METRICS) -> list[dict]:
    """The rows of a scale's table (bicubic, each run at that scale): label, our numbers in
    `metrics`, the paper's numbers."""
    srcnn = records[("srcnn", scale)]
    runs = [("bicubic", f"Input LR ({scale}× + bicubic)", srcnn)]
    runs += [(name, MODEL_ROW[name], r) for (name, s), r in records.items() if s == scale]
    rows = []
    for key, label, record in runs:
        test = record.results["test"]
        entry = test["bicubic" if key == "bicubic" else "sr"]
        note = lpips_note(configs[(record.model, scale)], test)
        rows.append(
            {
                "image": key,
                "label": label,
                "ours": {k: entry[k] for m, _, _ in metrics for k in (m, f"{m}_std") if k in entry},
                "lpips_note": note,
                "paper": PAPER_TABLES.get(scale, {}).get(key),
                "cells": [
                    report.mean_std_cell(entry, m, d, note if m == "lpips" else "")
                    for m, _, d in metrics
                ],
            }
        )
    return rows


def table_markdown(scale: int, rows: list[dict], srcnn: RunRecord) -> str:
    """A scale's table as markdown, captioned with what was measured on what."""
    number = TABLE_NUMBER.get(scale)
    title = f"Table {number}" if number else "Table"
    test = srcnn.results["test"]
    has_paper = scale in PAPER_TABLES
    header = ["Image"] + [label for _, label, _ in METRICS]
    if has_paper:
        header += [f"Paper {label}" for _, label, _ in METRICS]
    cells = [
        [row["label"], *row["cells"], *(row["paper"] or ("—",) * len(METRICS) if has_paper else ())]
        for row in rows
    ]
    lines = [
        f"### {title}: {scale}× downscaled simulation",
        "",
        *report.markdown_table(header, cells),
    ]
    lines += [
        "",
        f"Ours: mean ± std over {count_of(test['num_slices'], 'test slice')} of "
        f"{count_of(test['num_patients'], 'patient')}, scored as the paper: each slice min–max "
        "scaled to 8 bits, outputs stored as 8-bit images, PSNR with data range 1, SSIM with "
        "scikit-image's defaults (7×7 uniform window), LPIPS(VGG)."
        + (f" Paper columns: {PAPER_SOURCE}." if has_paper else " The paper has no table here."),
    ]
    notes = {row["lpips_note"] for row in rows if row["lpips_note"]}
    if notes:
        lines.append("LPIPS: " + "; ".join(sorted(notes)) + ".")
    return "\n".join(lines) + "\n"


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


def physical_table_markdown(scale: int, rows: list[dict], srcnn: RunRecord) -> str:
    """The second table of a scale: the same outputs mapped back to each volume's own scale."""
    test = srcnn.results["test"]
    header = ["Image"] + [label for _, label, _ in PHYSICAL_METRICS]
    lines = [
        f"#### The same outputs per volume, {scale}×",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join([row["label"]] + row["cells"]) + " |" for row in rows]
    lines += [
        "",
        "Each 8-bit output mapped back to its slice's range, every volume divided by its maximum "
        "(relative activity kept across slices); Gaussian-window SSIM; "
        + (
            '"brain" = inside the brain mask. '
            if report.has_brain_mask(srcnn.results)
            else "brain columns n/a: the data root has no brain mask for every test patient. "
        )
        + f"{count_of(test['num_slices'], 'test slice')} of "
        f"{count_of(test['num_patients'], 'patient')}.",
    ]
    return "\n".join(lines) + "\n"


def regional_recovery(models: dict, records: dict, configs: dict, scale: int) -> dict:
    """Grey-matter and lesion activity errors (physical units) of bicubic and each model at
    `scale`, on the test patients (`petsr_jax.evaluation.regional.regional_recovery`)."""
    from petsr_jax import sharding
    from petsr_jax.evaluation import regional

    mesh = sharding.make_mesh(jax.local_devices())
    srcnn = records[("srcnn", scale)]
    root = data.resolve_root(configs[("srcnn", scale)])
    patients = _read_record(srcnn.workdir, layout.SPLIT)["test"]
    out = {}
    for (name, s), resolver in models.items():
        if s != scale:
            continue
        result = regional.regional_recovery(
            jax.device_get(resolver.params),
            root,
            patients,
            model=resolver.model,
            task=resolver.task,
            mesh=mesh,
            batch_size=resolver.batch_size,
        )
        out[name] = result
    return out


def regional_markdown(scale: int, recovery: dict) -> str:
    """Regional recovery as markdown: mean signed % error of each region's mean and maximum."""
    first = next(iter(recovery.values()))
    if not first["rows"]:
        return f"#### Regional recovery, {scale}×\n\nNo test patient has tissue or lesion maps.\n"
    lines = [
        f"#### Regional recovery, {scale}× (test patients, {first['units']})",
        "",
        "| region | n | image | mean error % | |mean error| % | max error % | |max error| % |",
        "|---|---|---|---|---|---|---|",
    ]
    images = [("bicubic", "Input LR (bicubic)", "srcnn")] + [
        ("sr", MODEL_SHORT[name], name) for name in recovery
    ]
    for kind, entry in sorted(first["summary"].items()):
        for image, label, run in images:
            stats = recovery[run]["summary"][kind][image]
            cells = [
                "n/a"
                if stats[k] is None
                else f"{stats[k]:+.1f}"
                if "abs" not in k
                else f"{stats[k]:.1f}"
                for k in (
                    "mean_error_pct",
                    "abs_mean_error_pct",
                    "max_error_pct",
                    "abs_max_error_pct",
                )
            ]
            lines.append(f"| {kind} | {entry['count']} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Error of the regional mean and maximum against the original, as % of the true value, "
        "averaged over regions; a smoothed small lesion loses its maximum first.",
    ]
    return "\n".join(lines) + "\n"


def figure_slices(config, workdir: Path) -> FigureSlices:
    """Up to `eval.num_figure_slices` test slices of different patients of a run's test split."""
    root = data.resolve_root(config)
    split = _read_record(workdir, layout.SPLIT)
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


def load_models(records: dict) -> dict:
    """(model, scale) → the run's `SuperResolver` (the params it scored, its own config)."""
    from petsr_jax import inference

    return {key: inference.load(record.workdir) for key, record in records.items()}


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


def image_grid(path: Path, columns: Sequence[tuple[str, object]], row_labels, *, mr_columns=()):
    """PNG grid: one row per slice, one column per (title, images [N, H, W]); returns its shape.

    PET panels of a row share one grey scale, 0 to the row's brightest PET panel, so the columns
    compare by eye. Columns named in `mr_columns` are scaled to their own 1st–99th percentile;
    a `None` image there draws an empty panel saying there is no MR for that slice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(row_labels), len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3 * n_cols, 3 * n_rows), squeeze=False)
    pet = [images for title, images in columns if title not in mr_columns]
    for i in range(n_rows):
        vmax = max(float(np.max(images[i])) for images in pet) or 1.0
        for j, (title, images) in enumerate(columns):
            ax = axes[i, j]
            image = images[i]
            if title not in mr_columns:
                ax.imshow(image, cmap="gray", vmin=0, vmax=vmax)
            elif image is None:
                ax.text(0.5, 0.5, "no T1 MR", ha="center", va="center", transform=ax.transAxes)
            else:
                lo, hi = np.percentile(image, (1, 99))
                ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_title(title if i == 0 else "")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(row_labels[i])
    fig.tight_layout()
    files.save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
    return n_rows, n_cols


def scale_figure(scale: int, models: dict, slices: FigureSlices, path: Path) -> dict:
    """Figures 2–4: the same test slices, bicubic | SRCNN | DeepSR | original."""
    panels = comparison_panels(models[("srcnn", scale)], models[("deepsr", scale)], slices.hr)
    shape = image_grid(
        path,
        [
            (f"{scale}× + bicubic", panels["bicubic"]),
            ("SRCNN", panels["srcnn"]),
            ("DeepSR", panels["deepsr"]),
            ("original", panels["original"]),
        ],
        slices.labels,
    )
    return {"path": path.name, "rows": shape[0], "cols": shape[1], "slices": slices.labels}


def enhancement_figure(scale: int, models: dict, slices: FigureSlices, path: Path) -> dict:
    """Figure 5: original | SRCNN(original) | DeepSR(original) | T1 MR of the same slice."""
    panels = enhancement_panels(models[("srcnn", scale)], models[("deepsr", scale)], slices)
    shape = image_grid(
        path,
        [
            ("original (input)", panels["original"]),
            (f"SRCNN ({scale}× model)", panels["srcnn"]),
            (f"DeepSR ({scale}× model)", panels["deepsr"]),
            ("T1 MR", panels["t1"]),
        ],
        slices.labels,
        mr_columns=("T1 MR",),
    )
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


def table_name(scale: int) -> str:
    number = TABLE_NUMBER.get(scale)
    return f"table{number}_x{scale}.md" if number else f"table_x{scale}.md"


def _lpips_availability(configs) -> str:
    """Whether LPIPS weights are on this machine (never downloads), in one sentence."""
    from petsr_jax.metrics import perceptual as lpips

    weights = next(iter(configs.values())).eval.lpips_weights or None
    found, where = lpips.lpips_availability(weights, allow_download=False)
    if found:
        return where
    # The first sentence says where it looked; the rest (how to provide them) is in
    # petsr_jax.metrics.perceptual.
    where = where.split(". ")[0]
    return f"weights not found ({where}); see petsr_jax.metrics.perceptual to provide them"


def _data_description(config) -> str:
    if config.data.root:
        return f"data root {config.data.root}"
    return (
        f"embedded synthetic cohort, preset {config.data.cohort!r} (seed {config.data.cohort_seed})"
    )


def protocol_description(settings: Settings) -> str:
    """Which protocol the runs follow, in words a reader of the report can act on."""
    flags = set(_tokens(settings.config_arg)) & set(FLAGS)
    if "tiny" in flags:
        text = "tiny (unit-test sized: a few steps; the numbers mean nothing)"
    elif settings.quick:
        text = "quick (each config's `quick` flag: small cohort, short training on a CPU)"
    else:
        text = "full paper protocol"
    text += "; the paper's data domain and metrics (`paper` flag)"
    if settings.config_arg:
        text += f", with config arg `{settings.config_arg}`"
    return text


def _split_description(record: RunRecord) -> str:
    split = _read_record(record.workdir, layout.SPLIT)
    counts = ", ".join(f"{len(split[k])} {k}" for k in ("train", "val", "test"))
    return f"{counts} patients"


def report_markdown(settings, configs, records, tables, figures, enhancement, meta) -> str:
    """report.md: settings, tables, figures, commands and run times."""
    any_config = configs[("srcnn", settings.scales[0])]
    lines = [
        "# Deep Convolutional Networks for PET Super-Resolution — reproduction",
        "",
        "## Settings",
        "",
        f"- Protocol: {protocol_description(settings)}",
        f"- Data: {_data_description(any_config)}; "
        f"{_split_description(records[('srcnn', settings.scales[0])])}; evaluation slices "
        f"`{any_config.data.eval_slices}` (training uses every slice)",
        f"- Scales: {', '.join(f'{s}×' for s in settings.scales)}",
        f"- LPIPS: {meta['lpips']}",
        f"- Devices: {meta['devices']}",
        "",
        "| model | scale | epochs | lr | batch | crop | blocks × width | parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, scale), config in configs.items():
        depth = (
            f"{config.model.num_blocks} × {config.model.width}"
            if model_of(model) == "deepsr"
            else "—"
        )
        lines.append(
            f"| {MODEL_SHORT[model]} | {scale}× | {config.train.epochs} | {config.train.lr:g} | "
            f"{config.train.batch_size} | {config.data.crop_size or 'whole slice'} | {depth} | "
            f"{records[(model, scale)].results['num_params']:,} |"
        )
    lines += ["", "## Tables", ""]
    for scale in settings.scales:
        lines += [tables[scale], ""]
    lines += ["## Figures", ""]
    for scale in settings.scales:
        fig = figures[scale]
        number = FIGURE_NUMBER.get(scale)
        lines += [
            f"**{'Figure ' + str(number) if number else 'Figure'}** ({scale}×): test slices of "
            f"different patients ({', '.join(fig['slices'])}); bicubic | SRCNN | DeepSR | "
            f"original. File: `{fig['path']}`",
            "",
            f"![{scale}× comparison]({fig['path']})",
            "",
        ]
    if enhancement is not None:
        note = (
            ""
            if enhancement["scale"] == ENHANCEMENT_SCALE
            else f" (no {ENHANCEMENT_SCALE}× run was asked for; using the {enhancement['scale']}× "
            "models)"
        )
        missing_t1 = "" if all(enhancement["has_t1"]) else " Some patients have no T1 MR."
        lines += [
            f"**Figure 5** (enhancement): original test slices given to the "
            f"{enhancement['scale']}×-trained models as they are, without degradation{note}; "
            f"original | SRCNN | DeepSR | T1 MR of the same slice.{missing_t1} "
            f"File: `{enhancement['path']}`",
            "",
            f"![enhancement]({enhancement['path']})",
            "",
        ]
    lines += [
        "## Commands",
        "",
        "```",
        f"{meta['command']}",
        "```",
        "",
        "Each run alone (same workdirs):",
        "",
        "```",
        *[r.main_command(settings) for r in records.values()],
        "```",
        "",
        "## Run times",
        "",
        f"This call: {meta['wall_s']:.0f} s in total.",
        "",
        "| model | scale | workdir | this call | steps | best step | training time (s) | "
        "wall time this call (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records.values():
        lines.append(
            f"| {MODEL_SHORT[r.model]} | {r.scale}× | `{r.workdir}` | {r.status} | "
            f"{r.results['step']} | {r.results['best_step']} | {r.results['train_time_s']:.1f} | "
            f"{r.wall_s:.1f} |"
        )
    lines += [
        "",
        "Training time: the run's training wall time with its validations, summed over "
        "resumptions up to their last checkpoints. Wall time this call: data loading, "
        "compilation, training, evaluation and outputs; near zero for a reused run.",
    ]
    return "\n".join(lines) + "\n"


def reproduce(
    settings: Settings | None = None,
    *,
    progress: bool = True,
    command: str | None = None,
    **kwargs,
) -> dict:
    """Train or reuse the runs, then write the tables, figures and report; return the summary.

    `reproduce(scales=(8,), quick=True)` or `reproduce(Settings(...))`. Returns the dict written
    to `<out>/results.json`: settings, tables (our and the paper's numbers), figures and runs.
    """
    t_start = time.perf_counter()
    settings = settings or Settings(**kwargs)
    settings = dataclasses.replace(
        settings,
        scales=tuple(int(s) for s in settings.scales),
        runs_dir=Path(settings.runs_dir),
        out_dir=Path(settings.out_dir),
    )
    configs = build_configs(settings)
    # One writer per output folder: a second reproduce into it stops before training anything.
    with _writer_lock(settings.out_dir, "reproduce"):
        return _tables_and_figures(
            settings, configs, run_all(settings, configs, progress=progress), t_start, command
        )


def _writer_lock(folder: Path, what: str):
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return WorkdirLock(folder, what=what)


def _tables_and_figures(settings, configs, records, t_start: float, command) -> dict:
    """Tables, figures and report.md of finished runs; the summary written to results.json."""

    models = load_models(records)
    tables, table_data = {}, {}
    for scale in settings.scales:
        srcnn = records[("srcnn", scale)]
        for (name, s), record in records.items():
            if s == scale and name != "srcnn":
                check_bicubic_agrees(srcnn, record)
        rows = table_rows(scale, records, configs)
        physical_rows = table_rows(scale, records, configs, PHYSICAL_METRICS)
        tables[scale] = (
            table_markdown(scale, rows, srcnn)
            + "\n"
            + physical_table_markdown(scale, physical_rows, srcnn)
        )
        table_data[scale] = {
            "paper_domain": [{k: v for k, v in row.items() if k != "cells"} for row in rows],
            "per_volume": [
                {k: v for k, v in row.items() if k not in ("cells", "paper")}
                for row in physical_rows
            ],
        }
        if scale == ENHANCEMENT_SCALE:
            recovery = regional_recovery(models, records, configs, scale)
            tables[scale] += "\n" + regional_markdown(scale, recovery)
            table_data[scale]["regional_recovery"] = {
                name: r["summary"] for name, r in recovery.items()
            }

    out = settings.out_dir
    for scale in settings.scales:
        if ("deepsr_mr", scale) in records:
            # PET-only vs MR-guided, with the lesion errors and figure that PSNR cannot replace.
            tables[scale] += "\n" + mr_guidance.compare_workdirs(
                records[("deepsr", scale)].workdir,
                records[("deepsr_mr", scale)].workdir,
                out,
                stem=f"mr_comparison_x{scale}",
            )
    figures = {}
    for scale in settings.scales:
        slices = figure_slices(configs[("srcnn", scale)], records[("srcnn", scale)].workdir)
        figures[scale] = scale_figure(scale, models, slices, out / figure_name(scale))
    enhancement_scale = (
        ENHANCEMENT_SCALE if ENHANCEMENT_SCALE in settings.scales else min(settings.scales)
    )
    slices = figure_slices(
        configs[("srcnn", enhancement_scale)], records[("srcnn", enhancement_scale)].workdir
    )
    enhancement = enhancement_figure(
        enhancement_scale, models, slices, out / "figure5_enhancement.png"
    )
    meta = {
        "command": command or settings.command(),
        "lpips": _lpips_availability(configs),
        "devices": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
        "wall_s": time.perf_counter() - t_start,
    }
    summary = {
        "settings": {
            "scales": list(settings.scales),
            "quick": settings.quick,
            "config_arg": settings.config_arg,
            "protocol": protocol_description(settings),
            "runs_dir": str(settings.runs_dir),
            "data": _data_description(configs[("srcnn", settings.scales[0])]),
            **meta,
        },
        "paper_source": PAPER_SOURCE,
        "tables": {str(scale): table_data[scale] for scale in settings.scales},
        "figures": {str(scale): figures[scale] for scale in settings.scales},
        "enhancement": enhancement,
        "runs": [
            {
                "model": r.model,
                "scale": r.scale,
                "workdir": str(r.workdir),
                "status": r.status,
                "wall_s": round(r.wall_s, 1),
                "step": r.results["step"],
                "train_time_s": r.results["train_time_s"],
            }
            for r in records.values()
        ],
    }
    if jax.process_index() == 0:
        for scale in settings.scales:
            files.write_atomic(out / table_name(scale), tables[scale].encode())
        files.write_json_atomic(out / "results.json", summary)
        text = report_markdown(settings, configs, records, tables, figures, enhancement, meta)
        files.write_atomic(out / "report.md", text.encode())
    return summary
