"""PET-only against MR-guided super-resolution, side by side, with what an MR cannot see.

A T1 shows anatomy, not tracer uptake: cortex and white matter have edges in both, but a lesion
that exists in the PET only (as in the embedded cohort) has no edge in the T1. An MR-guided
network can therefore sharpen the cortex and, at the same time, flatten a lesion into the
surrounding anatomy or draw uptake along T1 edges that the PET does not have. Whole-image PSNR
would hide either; this comparison puts beside PSNR / SSIM (whole slice and brain) the errors of
grey-matter mean activity and of each lesion's mean and maximum activity and its contrast
recovery (`regional`) — all lesions, and those whose true uptake lies below grey matter's, the
ones an anatomy-trusting network fills upwards — with 95 % CIs, the paired difference of each
MR-guided run from the PET-only one lesion by lesion, and a figure of lesion crops: bicubic |
PET-only | each MR-guided | original | T1.

`compare_workdirs(pet_only, mr_guided)` works on finished runs of the same scale, data root and
split (their results.json hold the scores and the regional recovery), one PET-only and one or
more MR-guided (variants of the method: `mr.dropout`, `task.consistency`);
`launch/compare_mr.py` and `launch/reproduce.py` write its table and figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from petsr_jax import data
from petsr_jax.evaluation import regional, report
from petsr_jax.io import files
from petsr_jax.run import layout

# Columns: (results key, header, digits). Whole-slice and brain scores of the run's domain.
SCORE_COLUMNS = report.score_columns("psnr", "ssim", "psnr_brain", "ssim_brain")
# Regional columns: (summary group, statistic, header); signed and absolute % errors, CRC.
REGION_COLUMNS = (
    ("grey_matter", "mean_error_pct", "GM mean err %"),
    ("lesion", "mean_error_pct", "lesion mean err %"),
    ("lesion", "abs_mean_error_pct", "lesion |mean err| %"),
    ("lesion", "crc", "lesion CRC"),
    ("lesion_below_gm", "mean_error_pct", "below-GM lesion mean err %"),
    ("lesion_below_gm", "abs_mean_error_pct", "below-GM lesion |mean err| %"),
    ("lesion_cold", "crc", "cold lesion CRC"),
    ("lesion", "abs_max_error_pct", "lesion |max err| %"),
)
# Columns shown with their 95 % CI.
WITH_CI = {"lesion/abs_mean_error_pct", "lesion/crc", "lesion_below_gm/abs_mean_error_pct"}
# Lesion groups of the paired differences.
PAIRED_GROUPS = (("lesion", "all lesions"), ("lesion_below_gm", "lesions below GM uptake"))


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


def run_label(config: dict) -> str:
    """An MR-guided run's table row: anchored to a PET-only network or not, and the options it
    was trained with."""
    mr, extras = config.get("mr", {}), []
    anchor = mr.get("anchor_block", 0)
    if anchor:
        grid = ", every grid offset" if mr.get("anchor_unblocked") else ""
        extras.append(f"anchored per {anchor}×{anchor} block{grid}")
    dropout = mr.get("dropout", 0.0)
    if dropout:
        extras.append(f"T1 dropped for {dropout:.0%} in training")
    if config.get("task", {}).get("consistency", "none") == "block":
        extras.append("activity kept per block")
    lesion_weight = config.get("train", {}).get("lesion_weight", 0.0)
    if lesion_weight:
        extras.append(f"lesions weighted {1 + lesion_weight:g}×")
    if mr.get("coordinates"):
        extras.append("coordinates")
    name = "MR-guided" if anchor else "MR-guided, not anchored"
    return name + (f" ({', '.join(extras)})" if extras else "")


def _row(label: str, workdir, results: dict, image: str) -> dict:
    regional = (results.get("regional") or {}).get("summary", {})
    regions, ci = {}, {}
    for group, stat, _ in REGION_COLUMNS:
        stats = regional.get(group, {}).get(image, {})
        regions[f"{group}/{stat}"] = stats.get(stat)
        ci[f"{group}/{stat}"] = stats.get("ci95", {}).get(stat)
    return {
        "label": label,
        "workdir": str(workdir),
        "scores": {k: results["test"][image].get(k) for k, _, _ in SCORE_COLUMNS},
        "regions": regions,
        "ci95": ci,
        "region_counts": {group: entry.get("count", 0) for group, entry in regional.items()},
    }


def comparison_rows(pet_only: dict, mr_guided: list[dict]) -> list[dict]:
    """Bicubic, PET-only and each MR-guided run: their test scores and regional errors."""
    rows = [
        _row("bicubic", pet_only["workdir"], pet_only["results"], "bicubic"),
        _row("PET-only", pet_only["workdir"], pet_only["results"], "sr"),
    ]
    for run in mr_guided:
        rows.append(_row(run_label(run["config"]), run["workdir"], run["results"], "sr"))
    return rows


def _lesion_errors(results: dict, group: str) -> dict[tuple[str, str], float]:
    """|mean error| % of each lesion of `group` in a run's regional rows, by (patient, region)."""
    recovery = results.get("regional") or {}
    field = {g: (f, v) for g, f, v in regional.LESION_GROUPS}.get(group)
    errors = {}
    for row in recovery.get("rows", []):
        if row["kind"] != "lesion" or (field and row.get(field[0]) != field[1]):
            continue
        value = row["sr"].get("mean_error_pct")
        if value is not None:
            errors[(row["patient"], row["region"])] = abs(value)
    return errors


def paired_differences(pet_only: dict, mr_guided: list[dict]) -> list[dict]:
    """Per MR-guided run and lesion group: the mean over lesions of (MR-guided |mean error| −
    PET-only |mean error|), in % points, with its 95 % CI — lesion by lesion, so the spread
    between lesions, which dwarfs the difference between methods, does not hide it. Negative:
    the MR-guided run is closer to the truth."""
    out = []
    for run in mr_guided:
        for group, name in PAIRED_GROUPS:
            base = _lesion_errors(pet_only["results"], group)
            other = _lesion_errors(run["results"], group)
            shared = sorted(set(base) & set(other))
            mean, ci = regional.mean_and_ci([other[k] - base[k] for k in shared])
            out.append(
                {
                    "label": run_label(run["config"]),
                    "group": name,
                    "count": len(shared),
                    "mean_difference": mean,
                    "ci95": ci,
                }
            )
    return out


def comparison_markdown(
    rows: list[dict], scale: int, figure: str | None = None, paired: list[dict] | None = None
) -> str:
    """The side-by-side table, the paired lesion differences, what the columns mean and where
    MR is blind."""
    header = [h for _, h, _ in SCORE_COLUMNS] + [h for _, _, h in REGION_COLUMNS]
    cells = []
    for row in rows:
        region_cells = []
        for group, stat, _ in REGION_COLUMNS:
            key = f"{group}/{stat}"
            digits = 2 if stat == "crc" else 1
            signed = stat == "mean_error_pct" or stat == "max_error_pct"
            ci = row["ci95"].get(key) if key in WITH_CI else None
            region_cells.append(regional.number_cell(row["regions"][key], digits, signed, ci))
        cells.append(
            [row["label"]]
            + [regional.number_cell(row["scores"][k], d) for k, _, d in SCORE_COLUMNS]
            + region_cells
        )
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
        f"{counts.get('grey_matter', 0)} grey-matter regions and {counts.get('lesion', 0)} "
        f"lesions ({counts.get('lesion_below_gm', 0)} with uptake below grey matter's, "
        f"{counts.get('lesion_cold', 0)} cold); signed: bias, |·|: size, in brackets the 95 % "
        "CI of the mean. CRC: the lesion-to-surroundings contrast recovered (1 = true, 0 = "
        "flattened). The T1 has no lesions: an MR-guided model that erased or invented uptake "
        "shows here, not in PSNR.",
    ]
    if paired:
        lines += [
            "",
            "Lesion by lesion, MR-guided |mean err| − PET-only |mean err| (% points; negative: "
            "the MR-guided run is closer to the truth):",
            "",
            *report.markdown_table(
                ["run", "lesions", "n", "mean difference (95 % CI)"],
                [
                    [
                        p["label"],
                        p["group"],
                        str(p["count"]),
                        regional.number_cell(p["mean_difference"], 1, True, p["ci95"]),
                    ]  # fmt: skip
                    for p in paired
                ],
            ),
        ]
    if figure:
        lines += ["", f"![bicubic | PET-only | MR-guided | original | T1, lesion crops]({figure})"]
    return "\n".join(lines) + "\n"


def add_regional(run: dict, resolver, root: Path) -> None:
    """A run's regional recovery, measured now by this code on its test patients (the same
    function training records): every run of a comparison is measured alike, whenever and by
    whichever version it was trained."""
    recovery = regional.recovery_of_run(resolver, root, run["split"]["test"])
    run["results"]["regional"] = recovery if recovery["rows"] else None


def lesion_picks(root, patients, count: int = 6) -> list[tuple[str, int, int]]:
    """(patient, slice, lesion label) of up to `count` lesions of the test patients, each on its
    largest cross-section: those with uptake below grey matter's first (where an MR-guided
    network is tempted to fill in the anatomy's uptake), then the largest."""
    candidates = []
    paths = data.list_patients(root)
    for pid in sorted(patients):
        scan = data.load_patient(root, pid, paths[pid])
        if scan.lesions is None or not np.any(scan.lesions > 0):
            continue
        truth = scan.volume.data
        grey = None if scan.labels is None else scan.labels == regional.GREY_MATTER_LABEL
        grey_mean = truth[grey].mean() if grey is not None and grey.any() else None
        for label in np.unique(scan.lesions[scan.lesions > 0]):
            inside = scan.lesions == label
            area = inside.reshape(inside.shape[0], -1).sum(axis=1)
            below = grey_mean is not None and truth[inside].mean() < grey_mean
            candidates.append((not below, -int(area.max()), pid, int(np.argmax(area)), int(label)))
    return [(pid, z, label) for _, _, pid, z, label in sorted(candidates)[:count]]


def _crop_box(mask: np.ndarray, margin: float = 2.5, least: int = 12):
    """A square window around a lesion's cross-section: `margin` × its radius each side."""
    rows, cols = np.nonzero(mask)
    centre = (int(round(rows.mean())), int(round(cols.mean())))
    radius = np.sqrt(mask.sum() / np.pi)
    half = max(least, int(np.ceil(margin * radius)))
    return tuple(
        slice(max(c - half, 0), min(c + half, size))
        for c, size in zip(centre, mask.shape, strict=True)
    )


def figure_panels(pet_only, mr_guided: list, root, picks) -> dict[str, list]:
    """Lesion crops of the picked slices: the bicubic input, the PET-only and each MR-guided
    reconstruction (degraded ×scale, recovered), the original, the T1 and the lesion outline;
    PET panels normalised by each volume's maximum."""
    panels: dict[str, list] = {k: [] for k in ("bicubic", "pet_only", "original", "t1", "lesion")}
    panels["mr_guided"] = [[] for _ in mr_guided]
    paths = data.list_patients(root)
    for pid, z, label in picks:
        scan = data.load_patient(root, pid, paths[pid])
        hr, _ = data.normalise(scan.volume.data)
        box = _crop_box(scan.lesions[z] == label)
        bicubic, pet_sr = pet_only.reconstruct_normalised(hr[z : z + 1])
        panels["bicubic"].append(bicubic[0][box])
        panels["pet_only"].append(pet_sr[0][box])
        guide = mr_guided[0].guide_for(scan.t1, scan.volume.data)
        for k, resolver in enumerate(mr_guided):
            _, mr_sr = resolver.reconstruct_normalised(hr[z : z + 1], guide=guide[z : z + 1])
            panels["mr_guided"][k].append(mr_sr[0][box])
        panels["original"].append(hr[z][box])
        panels["t1"].append(guide[z, ..., 0][box])
        panels["lesion"].append((scan.lesions[z] == label)[box])
    return panels


def comparison_figure(path: Path, panels: dict, labels: list[str], mr_titles: list[str]):
    """bicubic | PET-only | each MR-guided | original | T1, one lesion per row, outlined (long
    titles wrapped to the panel's width)."""
    import textwrap

    mr_titles = [textwrap.fill(title, 28) for title in mr_titles]
    columns = [
        report.GridColumn("bicubic (input)", panels["bicubic"]),
        report.GridColumn("PET-only DeepSR", panels["pet_only"]),
        *(
            report.GridColumn(title, images)
            for title, images in zip(mr_titles, panels["mr_guided"], strict=True)
        ),
        report.GridColumn("original", panels["original"]),
        report.GridColumn("T1 (input channel)", panels["t1"], "mr"),
    ]
    reference = len(columns) - 2
    report.image_grid(path, columns, labels, reference=reference, outlines=panels["lesion"])


def compare_workdirs(pet_only_dir, mr_guided_dirs, out_dir, *, stem: str = "mr_comparison") -> str:
    """`<stem>.md`, `.json` and `.png` of a PET-only and one or more MR-guided runs
    (`mr_guided_dirs`, a workdir or a list) into `out_dir`; returns the markdown."""
    from petsr_jax import inference

    if isinstance(mr_guided_dirs, (str, Path)):
        mr_guided_dirs = [mr_guided_dirs]
    if not mr_guided_dirs:
        raise ComparisonError("no MR-guided run to compare")
    pet_only = read_run(pet_only_dir)
    mr_guided = [read_run(d) for d in mr_guided_dirs]
    for run in mr_guided:
        check_comparable(pet_only, run)
    pet_resolver = inference.load(pet_only_dir)
    mr_resolvers = [inference.load(d) for d in mr_guided_dirs]
    root = Path(layout.read_data_info(mr_guided_dirs[0])["root"])
    for run, resolver in zip([pet_only, *mr_guided], [pet_resolver, *mr_resolvers], strict=True):
        add_regional(run, resolver, root)
    rows = comparison_rows(pet_only, mr_guided)
    paired = paired_differences(pet_only, mr_guided)
    scale = int(pet_only["results"]["scale"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = lesion_picks(root, mr_guided[0]["split"]["test"])
    figure, figure_name = None, f"{stem}.png"
    if picks:
        panels = figure_panels(pet_resolver, mr_resolvers, root, picks)
        labels = [f"{p} z={z} lesion {k}" for p, z, k in picks]
        titles = [run_label(run["config"]) for run in mr_guided]
        comparison_figure(out_dir / figure_name, panels, labels, titles)
        figure = figure_name
    markdown = comparison_markdown(rows, scale, figure, paired)
    record = {"scale": scale, "rows": rows, "paired_lesion_differences": paired}
    files.write_json_atomic(out_dir / f"{stem}.json", record)
    files.write_atomic(out_dir / f"{stem}.md", markdown.encode())
    return markdown
