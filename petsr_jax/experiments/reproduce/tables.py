"""The reproduction's tables: the paper's Tables 1–3 beside ours, the same outputs per volume,
and regional recovery.

A scale's table has the bicubic row ("Input LR (N× + bicubic)", measured by the SRCNN run) and
one row per run of that scale, with PSNR, SSIM (scikit-image's default window) and LPIPS as
mean ± std over test slices, and the paper's published numbers beside them (`PAPER_TABLES`);
then the same outputs mapped back to each volume's own scale (whole slice and brain), at 8× the
regional recovery of grey matter and lesions, and with an MR-guided run the PET-only vs
MR-guided comparison (`petsr_jax.experiments.mr_guidance`).
"""

from __future__ import annotations

from pathlib import Path

from petsr_jax import data
from petsr_jax.evaluation import regional, report
from petsr_jax.evaluation.report import count_of
from petsr_jax.experiments import mr_guidance
from petsr_jax.experiments.reproduce.runs import RunRecord, read_record
from petsr_jax.run import layout

TABLE_NUMBER = {8: 1, 12: 2, 16: 3}
# The scale whose tables add the regional recovery of grey matter and lesions.
REGIONAL_SCALE = 8

# What the tables call each run: the networks by their names in every table of the project,
# the runs beside them by what they change.
_NAMES = {
    **report.MODEL_NAMES,
    "deepsr_image": "DeepSR, image-level skip (paper text)",
    "deepsr_mr": "MR-guided DeepSR (PET + T1, anchored)",
}
MODEL_ROW = {name: f"Output SR from {label}" for name, label in _NAMES.items()}
MODEL_SHORT = {
    "srcnn": "SRCNN",
    "deepsr": "DeepSR",
    "deepsr_image": "DeepSR (image skip)",
    "deepsr_mr": "DeepSR + T1",
}

METRICS = report.score_columns("psnr", "ssim", "lpips")
# The same outputs mapped back per slice and scored per volume (petsr_jax.evaluation.evaluate).
PHYSICAL_METRICS = report.score_columns(
    "psnr_physical", "ssim_physical", "psnr_brain", "ssim_brain"
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


def physical_table_markdown(scale: int, rows: list[dict], srcnn: RunRecord) -> str:
    """The second table of a scale: the same outputs mapped back to each volume's own scale."""
    test = srcnn.results["test"]
    header = ["Image"] + [label for _, label, _ in PHYSICAL_METRICS]
    lines = [
        f"#### The same outputs per volume, {scale}×",
        "",
        *report.markdown_table(header, [[row["label"], *row["cells"]] for row in rows]),
    ]
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
    root = data.resolve_root(configs[("srcnn", scale)])
    patients = read_record(records[("srcnn", scale)].workdir, layout.SPLIT)["test"]
    return {
        name: regional.recovery_of_run(resolver, root, patients)
        for (name, s), resolver in models.items()
        if s == scale
    }


def regional_markdown(scale: int, recovery: dict) -> str:
    """Regional recovery as markdown: activity errors and lesion CRC of bicubic and each model
    (`regional.recovery_table`)."""
    first = next(iter(recovery.values()))
    if not first["rows"]:
        return f"#### Regional recovery, {scale}×\n\nNo test patient has tissue or lesion maps.\n"
    columns = [("Input LR (bicubic)", first["summary"], "bicubic")] + [
        (MODEL_SHORT[name], recovery[name]["summary"], "sr") for name in recovery
    ]
    lines = [
        f"#### Regional recovery, {scale}× (test patients, {first['units']})",
        "",
        *regional.recovery_table(columns),
        "",
        regional.REGIONAL_NOTE,
    ]
    return "\n".join(lines) + "\n"


def scale_tables(scale: int, records: dict, configs: dict, models: dict, out_dir: Path):
    """A scale's tables as markdown, and their numbers for results.json.

    The paper's table and the per-volume one, at `REGIONAL_SCALE` the regional recovery, and
    with an MR-guided run the PET-only vs MR-guided comparison, whose own files (table, numbers,
    figure) go to `out_dir`. `models`: (name, scale) → the run's loaded `SuperResolver`.
    """
    srcnn = records[("srcnn", scale)]
    rows = table_rows(scale, records, configs)
    physical_rows = table_rows(scale, records, configs, PHYSICAL_METRICS)
    markdown = (
        table_markdown(scale, rows, srcnn)
        + "\n"
        + physical_table_markdown(scale, physical_rows, srcnn)
    )
    numbers = {
        "paper_domain": [{k: v for k, v in row.items() if k != "cells"} for row in rows],
        "per_volume": [
            {k: v for k, v in row.items() if k not in ("cells", "paper")} for row in physical_rows
        ],
    }
    if scale == REGIONAL_SCALE:
        recovery = regional_recovery(models, records, configs, scale)
        markdown += "\n" + regional_markdown(scale, recovery)
        numbers["regional_recovery"] = {name: r["summary"] for name, r in recovery.items()}
    if ("deepsr_mr", scale) in records:
        # PET-only vs MR-guided, with the lesion errors and figure that PSNR cannot replace.
        markdown += "\n" + mr_guidance.compare_workdirs(
            records[("deepsr", scale)].workdir,
            records[("deepsr_mr", scale)].workdir,
            out_dir,
            stem=f"mr_comparison_x{scale}",
        )
    return markdown, numbers


def table_name(scale: int) -> str:
    number = TABLE_NUMBER.get(scale)
    return f"table{number}_x{scale}.md" if number else f"table_x{scale}.md"
