"""PET-only against MR-guided super-resolution, side by side, with what an MR cannot see.

A T1 shows anatomy, not tracer uptake: cortex and white matter have edges in both, but a lesion
that exists in the PET only (as in the embedded cohort) has no edge in the T1. An MR-guided
network can therefore sharpen the cortex and, at the same time, flatten a lesion into the
surrounding anatomy or draw uptake along T1 edges that the PET does not have. Whole-image PSNR
would hide either; this comparison puts beside PSNR / SSIM (whole slice and brain) the errors of
grey-matter mean activity and of each lesion's mean and maximum activity (`regional`), and a
figure of test slices with a lesion in view: PET-only | MR-guided | original | T1.

`compare_workdirs(pet_only, mr_guided)` works on two finished runs of the same scale, data root
and split (their results.json hold the scores and the regional recovery); `launch/compare_mr.py`
and `launch/reproduce.py` write its table and figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from petsr_jax import data
from petsr_jax.evaluation import report
from petsr_jax.io import files
from petsr_jax.run import layout

# Columns: (results key, header, digits). Whole-slice and brain scores of the run's domain.
SCORE_COLUMNS = report.score_columns("psnr", "ssim", "psnr_brain", "ssim_brain")
# Regional columns: (region kind, statistic, header); mean signed and mean absolute % errors.
REGION_COLUMNS = (
    ("grey_matter", "mean_error_pct", "GM mean err %"),
    ("lesion", "mean_error_pct", "lesion mean err %"),
    ("lesion", "abs_mean_error_pct", "lesion |mean err| %"),
    ("lesion", "max_error_pct", "lesion max err %"),
    ("lesion", "abs_max_error_pct", "lesion |max err| %"),
)
ROWS = (("bicubic", "pet_only", "bicubic"), ("PET-only", "pet_only", "sr"))


class ComparisonError(ValueError):
    """Two runs that cannot be compared; the message names the workdirs and the difference."""


def read_run(workdir) -> dict:
    """A finished run's results.json, split.json and config.json."""
    workdir = Path(workdir)
    run = {"workdir": workdir}
    records = {"results": layout.RESULTS, "split": layout.SPLIT, "config": layout.CONFIG}
    for key, name in records.items():
        try:
            run[key] = layout.read_record(workdir, name)
        except layout.WorkdirError as error:
            raise ComparisonError(f"{workdir}: not a finished training run ({error})") from None
        if run[key] is None:
            raise ComparisonError(f"{workdir}: not a finished training run (no {name})")
    return run


def check_comparable(pet_only: dict, mr_guided: dict) -> None:
    """Same scale, split, data root and domain; the first PET-only, the second MR-guided."""
    where = f"{pet_only['workdir']} and {mr_guided['workdir']}"
    if pet_only["config"].get("mr", {}).get("t1"):
        raise ComparisonError(f"{pet_only['workdir']} is MR-guided; give a PET-only run first")
    if not mr_guided["config"].get("mr", {}).get("t1"):
        raise ComparisonError(f"{mr_guided['workdir']} was trained without the mr flag")
    for field in ("scale", "domain"):
        a, b = pet_only["results"].get(field), mr_guided["results"].get(field)
        if a != b:
            raise ComparisonError(f"{where}: {field} differs ({a} vs {b})")
    if pet_only["split"].get("test") != mr_guided["split"].get("test"):
        raise ComparisonError(f"{where}: the test patients differ; train both on one split")


def comparison_rows(pet_only: dict, mr_guided: dict) -> list[dict]:
    """Bicubic, PET-only and MR-guided: their test scores and regional errors."""
    runs = {"pet_only": pet_only["results"], "mr_guided": mr_guided["results"]}
    rows = []
    for label, run, image in ROWS + (("MR-guided", "mr_guided", "sr"),):
        results = runs[run]
        regional = (results.get("regional") or {}).get("summary", {})
        rows.append(
            {
                "label": label,
                "scores": {k: results["test"][image].get(k) for k, _, _ in SCORE_COLUMNS},
                "regions": {
                    f"{kind}/{stat}": regional.get(kind, {}).get(image, {}).get(stat)
                    for kind, stat, _ in REGION_COLUMNS
                },
                "region_counts": {
                    kind: regional.get(kind, {}).get("count", 0) for kind in regional
                },
            }
        )
    return rows


def _number(value, digits: int, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def comparison_markdown(rows: list[dict], scale: int, figure: str | None = None) -> str:
    """The side-by-side table, with what the regional columns mean and where MR is blind."""
    header = [h for _, h, _ in SCORE_COLUMNS] + [h for _, _, h in REGION_COLUMNS]
    cells = [
        [row["label"]]
        + [_number(row["scores"][k], d) for k, _, d in SCORE_COLUMNS]
        + [
            _number(row["regions"][f"{kind}/{stat}"], 1, signed="abs" not in stat)
            for kind, stat, _ in REGION_COLUMNS
        ]
        for row in rows
    ]
    lines = [
        f"#### PET-only vs MR-guided DeepSR, {scale}× (test patients)",
        "",
        *report.markdown_table(["image", *header], cells),
    ]
    counts = rows[-1]["region_counts"]
    lines += [
        "",
        "Scores: mean over test slices. Regional: error of the region's mean / maximum activity "
        "against the original, % of the true value, averaged over "
        f"{counts.get('grey_matter', 0)} grey-matter and {counts.get('lesion', 0)} lesion "
        "regions (signed: bias; |·|: size). The T1 has no lesions: an MR-guided model that "
        "erased or invented uptake shows here, not in PSNR.",
    ]
    if figure:
        lines += ["", f"![PET-only | MR-guided | original | T1]({figure})"]
    return "\n".join(lines) + "\n"


def add_regional(run: dict, resolver, root: Path) -> None:
    """A run's regional recovery: from its results.json, or measured now for a run finished
    before training recorded it (same function, same test patients)."""
    if "regional" in run["results"]:
        return
    from petsr_jax.evaluation import regional

    recovery = regional.recovery_of_run(resolver, root, run["split"]["test"])
    run["results"]["regional"] = recovery if recovery["rows"] else None


def lesion_slices(root, patients, count: int = 4) -> list[tuple[str, int]]:
    """(patient, slice) of up to `count` patients: each one's slice with the largest lesion
    area (patients without lesion labels are skipped)."""
    picks = []
    paths = data.list_patients(root)
    for pid in sorted(patients):
        scan = data.load_patient(root, pid, paths[pid])
        if scan.lesions is None or not np.any(scan.lesions > 0):
            continue
        area = (scan.lesions > 0).reshape(scan.lesions.shape[0], -1).sum(axis=1)
        picks.append((pid, int(np.argmax(area))))
        if len(picks) == count:
            break
    return picks


def figure_panels(pet_only, mr_guided, root, picks) -> dict[str, list]:
    """PET-only and MR-guided reconstructions (degraded ×scale, recovered) of the picked slices,
    the original, the T1 and the lesion labels; PET panels normalised by each volume's maximum."""
    panels: dict[str, list] = {k: [] for k in ("pet_only", "mr_guided", "original", "t1", "lesion")}
    paths = data.list_patients(root)
    for pid, z in picks:
        scan = data.load_patient(root, pid, paths[pid])
        hr, _ = data.normalise(scan.volume.data)
        guide = mr_guided.guide_for(scan.t1, scan.volume.data)
        _, pet_sr = pet_only.reconstruct_normalised(hr[z : z + 1])
        _, mr_sr = mr_guided.reconstruct_normalised(hr[z : z + 1], guide=guide[z : z + 1])
        panels["pet_only"].append(pet_sr[0])
        panels["mr_guided"].append(mr_sr[0])
        panels["original"].append(hr[z])
        panels["t1"].append(guide[z, ..., 0])
        panels["lesion"].append(scan.lesions[z] > 0)
    return panels


def comparison_figure(path: Path, panels: dict, labels: list[str]) -> None:
    """PET-only | MR-guided | original | T1, one row per slice, lesions outlined in red."""
    columns = [
        report.GridColumn("PET-only DeepSR", panels["pet_only"]),
        report.GridColumn("MR-guided DeepSR", panels["mr_guided"]),
        report.GridColumn("original", panels["original"]),
        report.GridColumn("T1 (input channel)", panels["t1"], "mr"),
    ]
    report.image_grid(path, columns, labels, outlines=panels["lesion"])


def compare_workdirs(pet_only_dir, mr_guided_dir, out_dir, *, stem: str = "mr_comparison") -> str:
    """`<stem>.md`, `.json` and `.png` of a PET-only and an MR-guided run into `out_dir`;
    returns the markdown."""
    from petsr_jax import inference

    pet_only, mr_guided = read_run(pet_only_dir), read_run(mr_guided_dir)
    check_comparable(pet_only, mr_guided)
    resolvers = inference.load(pet_only_dir), inference.load(mr_guided_dir)
    root = Path(layout.read_data_info(mr_guided_dir)["root"])
    for run, resolver in zip((pet_only, mr_guided), resolvers, strict=True):
        add_regional(run, resolver, root)
    rows = comparison_rows(pet_only, mr_guided)
    scale = int(pet_only["results"]["scale"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = lesion_slices(root, mr_guided["split"]["test"])
    figure, figure_name = None, f"{stem}.png"
    if picks:
        panels = figure_panels(*resolvers, root, picks)
        comparison_figure(out_dir / figure_name, panels, [f"{p} z={z}" for p, z in picks])
        figure = figure_name
    markdown = comparison_markdown(rows, scale, figure)
    files.write_json_atomic(out_dir / f"{stem}.json", {"scale": scale, "rows": rows})
    files.write_atomic(out_dir / f"{stem}.md", markdown.encode())
    return markdown
