"""Regional recovery in physical units: the clinical question behind PSNR and SSIM.

How far do bicubic and SR move the mean and maximum activity (what a reader measures as SUVmean
and SUVmax) of grey matter and of each lesion, and how much of each lesion's contrast against
its surroundings do they recover? Answered per patient on the slices that hold a region, after
the same normalisation, domain and degradation as evaluation.

Lesions are where an MR-guided network can invent PET: a lesion exists in the PET only, so a
network that trusts the T1 fills it with the uptake the anatomy predicts. A cold lesion, or a
hot one whose uptake lies below grey matter's, is filled *upwards*; so every lesion is also
summarised by kind (hot / cold against its shell) and by its true uptake against the patient's
grey matter, each group with its count and a 95 % confidence interval of the mean, since a
handful of lesions decides nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from petsr_jax import data
from petsr_jax.data import mr
from petsr_jax.evaluation.evaluate import IMAGES
from petsr_jax.evaluation.predict import predict_slices

# Tissue label code of grey matter in <root>/labels/ (petsr_jax.data, petsr_jax.sim.LABELS).
GREY_MATTER_LABEL = 1
# Summary groups of lesions beside all of them: (group, row field, value).
LESION_GROUPS = (
    ("lesion_hot", "lesion_type", "hot"),
    ("lesion_cold", "lesion_type", "cold"),
    ("lesion_above_gm", "gm_relation", "above"),
    ("lesion_below_gm", "gm_relation", "below"),
)
# A lesion's CRC needs a true contrast at least this far from 1 (`contrast_recovery`).
MIN_CONTRAST = 0.1
# Per-image statistics a summary averages; the first four are % of the true value.
STATISTICS = ("mean_error_pct", "max_error_pct", "crc")


def _percent_of(error: float, true_value: float) -> float | None:
    return 100.0 * error / true_value if true_value > 0 else None


def lesion_shells(
    lesions: np.ndarray, spacing_mm, brain: np.ndarray | None = None
) -> dict[int, np.ndarray]:
    """Each lesion's surroundings, the B of its contrast: the voxels within one equivalent-sphere
    radius of its edge that belong to no lesion (and lie in `brain` when given) — the r..2r
    shell on which the cohort draws a lesion's contrast. Keys are lesion labels; values are
    boolean maps on `lesions`' grid (`spacing_mm` its voxel size, z y x)."""
    spacing = np.asarray(spacing_mm, np.float64)
    any_lesion = lesions > 0
    shells = {}
    for label in np.unique(lesions[any_lesion]):
        inside = lesions == label
        radius = (3.0 * inside.sum() * spacing.prod() / (4.0 * np.pi)) ** (1.0 / 3.0)
        # A box around the lesion that holds every voxel within `radius` of it.
        reach = np.ceil(radius / spacing).astype(int) + 1
        where = np.argwhere(inside)
        low = np.maximum(where.min(axis=0) - reach, 0)
        high = np.minimum(where.max(axis=0) + reach + 1, lesions.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        distance = ndimage.distance_transform_edt(~inside[box], sampling=spacing)
        shell = (distance > 0) & (distance <= radius) & ~any_lesion[box]
        if brain is not None:
            shell &= brain[box]
        shells[int(label)] = np.zeros(lesions.shape, bool)
        shells[int(label)][box] = shell
    return shells


def contrast_recovery(contrast: float | None, true_contrast: float | None) -> float | None:
    """CRC of a lesion whose lesion-to-surroundings ratio is `contrast` against the true one.

    Hot, (L/B − 1) / (L_true/B_true − 1); cold, (1 − L/B) / (1 − L_true/B_true): one formula,
    1 when the contrast is recovered, 0 when the lesion is flattened into its surroundings,
    negative when it flips, above 1 when overshot. None without a contrast to recover: a lesion
    whose true contrast is within `MIN_CONTRAST` of 1 (a few-voxel lesion the reference scan
    itself has blurred into its surroundings) would divide noise by almost nothing.
    """
    if contrast is None or true_contrast is None or abs(true_contrast - 1.0) < MIN_CONTRAST:
        return None
    return (contrast - 1.0) / (true_contrast - 1.0)


def _ratio(values: np.ndarray, region: np.ndarray, shell: np.ndarray | None) -> float | None:
    """Mean over `region` / mean over `shell`; None without a shell or with no activity in it."""
    if shell is None or not shell.any():
        return None
    surround = float(values[shell].astype(np.float64).mean())
    return float(values[region].astype(np.float64).mean()) / surround if surround > 0 else None


def region_rows(
    truth: np.ndarray,
    images: dict[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    lesions: np.ndarray | None = None,
    shells: dict[int, np.ndarray] | None = None,
    patient: str = "",
    units: str = "unknown",
) -> list[dict]:
    """Activity recovery of each region: grey matter (labels == 1) and every lesion 1..K.

    For each region and image (e.g. "bicubic", "sr"): the regional mean and maximum, their error
    against `truth` (image − truth, in `units`) and that error as % of the true value (None when
    the true value is not positive). Mean and maximum are what a reader measures on a scan
    (SUVmean / SUVmax): smoothing lowers a small hot lesion's maximum long before its mean.
    A lesion with a shell (`lesion_shells`, on this grid) also gets its true contrast against
    the shell, `lesion_type` hot / cold, and per image its contrast and CRC
    (`contrast_recovery`); with grey matter in `labels`, `gm_relation` says whether its true
    uptake is above or below the grey matter's. Regions without voxels are skipped. All arrays
    share one grid.
    """
    regions, grey_matter_mean = [], None
    if labels is not None and np.any(labels == GREY_MATTER_LABEL):
        grey_matter = labels == GREY_MATTER_LABEL
        regions.append(("grey_matter", "grey_matter", grey_matter, None))
        grey_matter_mean = float(truth[grey_matter].astype(np.float64).mean())
    if lesions is not None:
        for k in np.unique(lesions[lesions > 0]):
            shell = None if shells is None else shells.get(int(k))
            regions.append((f"lesion_{int(k)}", "lesion", lesions == k, shell))
    rows = []
    for name, kind, region, shell in regions:
        true_values = truth[region].astype(np.float64)
        true_mean, true_max = float(true_values.mean()), float(true_values.max())
        row = {
            "patient": patient,
            "region": name,
            "kind": kind,
            "voxels": int(region.sum()),
            "units": units,
            "true_mean": true_mean,
            "true_max": true_max,
        }
        if kind == "lesion":
            true_contrast = _ratio(truth, region, shell)
            row["true_contrast"] = true_contrast
            row["lesion_type"] = (
                None if true_contrast is None else ("hot" if true_contrast > 1.0 else "cold")
            )
            row["gm_relation"] = (
                None
                if grey_matter_mean is None
                else ("above" if true_mean > grey_matter_mean else "below")
            )
        for image_name, image in images.items():
            values = image[region].astype(np.float64)
            mean, peak = float(values.mean()), float(values.max())
            row[image_name] = {
                "mean": mean,
                "max": peak,
                "mean_error": mean - true_mean,
                "mean_error_pct": _percent_of(mean - true_mean, true_mean),
                "max_error": peak - true_max,
                "max_error_pct": _percent_of(peak - true_max, true_max),
            }
            if kind == "lesion":
                contrast = _ratio(image, region, shell)
                row[image_name]["contrast"] = contrast
                row[image_name]["crc"] = contrast_recovery(contrast, row["true_contrast"])
        rows.append(row)
    return rows


def mean_and_ci(values) -> tuple[float | None, list[float] | None]:
    """Mean and its two-sided 95 % confidence interval (Student's t); None where undefined."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not values.size:
        return None, None
    mean = float(values.mean())
    if values.size < 2:
        return mean, None
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return mean, [mean - float(half), mean + float(half)]


def _group_stats(members: list[dict], image: str) -> dict:
    """One image's averages over a group of region rows, each with its 95 % CI."""
    entry: dict = {"ci95": {}}
    for key in STATISTICS:
        values = [r[image].get(key) for r in members]
        entry[key], entry["ci95"][key] = mean_and_ci(values)
        if key != "crc":
            present = [abs(v) for v in values if v is not None]
            entry[f"abs_{key}"], entry["ci95"][f"abs_{key}"] = mean_and_ci(present)
    if all(r["kind"] != "lesion" for r in members):
        del entry["crc"], entry["ci95"]["crc"]
    return entry


def summarise_regions(rows: list[dict], images: tuple[str, ...] = IMAGES) -> dict:
    """Per region kind (and lesion group, `LESION_GROUPS`) and image: count, mean signed and
    mean absolute % errors of mean and max, the lesions' mean CRC, each with its 95 % CI."""
    groups = {kind: [r for r in rows if r["kind"] == kind] for kind in {r["kind"] for r in rows}}
    lesions = groups.get("lesion", [])
    for group, field, value in LESION_GROUPS:
        groups[group] = [r for r in lesions if r.get(field) == value]
    return {
        group: {"count": len(members), **{image: _group_stats(members, image) for image in images}}
        for group, members in sorted(groups.items())
        if members
    }


def _guide(scan, keep: np.ndarray, guidance: tuple[str, ...]) -> np.ndarray | None:
    """The guidance channels of a patient's kept slices, as the slice sets make them."""
    if not guidance:
        return None
    if scan.t1 is None:
        raise data.DataError(f"patient {scan.patient_id} has no T1 MR for an MR-guided model")
    t1 = mr.normalise_t1(scan.t1)
    return mr.guide_slices(t1[keep], keep, t1.shape[0], guidance)


def regional_recovery(
    params,
    root,
    patient_ids,
    *,
    model,
    task,
    mesh,
    batch_size: int = 8,
) -> dict:
    """Bicubic and SR activity in grey matter and lesions against the original, physical units.

    For each patient of `root` (a data root with labels/ and/or lesions/ maps), the volume is
    degraded by `scale` and super-resolved as in evaluation (normalised by its maximum, taken
    into the run's `domain` and back), on the slices that hold a region. Returns `"rows"` (one
    row per patient and region, see `region_rows`), `"summary"` (see `summarise_regions`),
    `"units"` and `"skipped"` (patients without any region map). An MR-guided model gets its
    `guidance` channels (`mr.guidance_channels(config)`) from each patient's T1.
    """
    root = Path(root)
    paths = data.list_patients(root)
    rows, skipped, units = [], [], set()
    for pid in sorted(patient_ids):
        if pid not in paths:
            raise data.DataError(f"patient {pid} is not in {root}")
        scan = data.load_patient(root, pid, paths[pid])
        present = np.zeros(scan.volume.shape, bool)
        shells = {}
        if scan.labels is not None:
            present |= scan.labels == GREY_MATTER_LABEL
        if scan.lesions is not None:
            present |= scan.lesions > 0
            shells = lesion_shells(scan.lesions, scan.volume.spacing, scan.mask)
            for shell in shells.values():
                present |= shell
        keep = np.flatnonzero(present.reshape(present.shape[0], -1).any(axis=1))
        if not len(keep):
            skipped.append(pid)
            continue
        # Normalised by the whole volume's maximum, as in training, whichever slices are kept.
        hr, factor = data.normalise(scan.volume.data)
        lr_up, sr, _ = predict_slices(
            params,
            hr[keep],
            model=model,
            task=task,
            mesh=mesh,
            batch_size=batch_size,
            guide=_guide(scan, keep, task.guidance),
            context=(data.context_slices(hr, keep, task.neighbours) if task.neighbours else None),
        )
        rows += region_rows(
            scan.volume.data[keep],
            {"bicubic": data.denormalise(lr_up, factor), "sr": data.denormalise(sr, factor)},
            labels=None if scan.labels is None else scan.labels[keep],
            lesions=None if scan.lesions is None else scan.lesions[keep],
            shells={label: shell[keep] for label, shell in shells.items()},
            patient=pid,
            units=scan.volume.units,
        )
        units.add(scan.volume.units)
    return {
        "rows": rows,
        "summary": summarise_regions(rows),
        "units": units.pop() if len(units) == 1 else ("mixed" if units else "unknown"),
        "skipped": skipped,
    }


def recovery_of_run(resolver, root, patient_ids) -> dict:
    """`regional_recovery` of a loaded run (`petsr_jax.load`: the params it scored, its network,
    task and batch size) on this process's devices, as the reproduction's tables and the MR
    comparison measure it."""
    import jax

    from petsr_jax import sharding

    return regional_recovery(
        jax.device_get(resolver.params),
        root,
        patient_ids,
        model=resolver.model,
        task=resolver.task,
        mesh=sharding.make_mesh(jax.local_devices()),
        batch_size=resolver.batch_size,
    )


def number_cell(value, digits: int = 1, signed: bool = False, ci=None) -> str:
    """A table cell: `value` with `digits` decimals (a sign when `signed`), its 95 % CI in
    brackets when given, "n/a" for None."""
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text + (f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else "")


# Group names as a reader knows them.
GROUP_LABELS = {
    "grey_matter": "grey matter",
    "lesion": "lesions, all",
    "lesion_hot": "lesions, hot",
    "lesion_cold": "lesions, cold",
    "lesion_above_gm": "lesions above GM uptake",
    "lesion_below_gm": "lesions below GM uptake",
}


def recovery_table(columns: list[tuple[str, dict, str]]) -> list[str]:
    """Markdown table of regional summaries: for each region group, one row per `(label,
    summary, image)` of `columns` (e.g. `("bicubic", summary, "bicubic")`), with the mean and
    absolute % errors of mean and max activity, the CRC, and 95 % CIs of |mean error| and CRC."""
    lines = [
        "| region | n | image | mean err % | \\|mean err\\| % (95 % CI) | max err % "
        "| \\|max err\\| % | CRC (95 % CI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = columns[0][1]
    for group, name in GROUP_LABELS.items():
        if group not in first:
            continue
        for label, summary, image in columns:
            stats_ = summary[group][image]
            ci = stats_.get("ci95", {})
            cells = [
                number_cell(stats_["mean_error_pct"], signed=True),
                number_cell(stats_["abs_mean_error_pct"], ci=ci.get("abs_mean_error_pct")),
                number_cell(stats_["max_error_pct"], signed=True),
                number_cell(stats_["abs_max_error_pct"]),
                number_cell(stats_.get("crc"), 2, ci=ci.get("crc")) if "crc" in stats_ else "",
            ]
            count = summary[group]["count"]
            lines.append(f"| {name} | {count} | {label} | " + " | ".join(cells) + " |")
    return lines


REGIONAL_NOTE = (
    "Error of each region's mean and maximum activity against the original, % of the true "
    "value, averaged over regions (signed: bias; |·|: size); CRC, the lesion-to-shell contrast "
    "recovered (1 = the true contrast, 0 = flattened into its surroundings); 95 % CIs of the "
    "mean (Student's t). A lesion exists in the PET only: a network that fills it with the "
    "uptake the anatomy predicts shows in the lesions below grey-matter uptake."
)


def summary_lines(regional: dict | None) -> list[str]:
    """Markdown lines of a run's regional recovery (`results["regional"]`); none without it."""
    if not regional:
        return []
    summary = regional["summary"]
    return [
        "",
        f"Regional activity recovery (test patients, {regional['units']}):",
        "",
        *recovery_table([("bicubic", summary, "bicubic"), ("SR", summary, "sr")]),
        "",
        REGIONAL_NOTE,
    ]
