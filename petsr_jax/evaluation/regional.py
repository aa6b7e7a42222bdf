"""Regional recovery in physical units: the clinical question behind PSNR and SSIM.

How far do bicubic and SR move the mean and maximum activity (what a reader measures as SUVmean
and SUVmax) of grey matter and of each lesion? Answered per patient on the slices that hold a
region, after the same normalisation, domain and degradation as evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from petsr_jax import data
from petsr_jax.data import mr
from petsr_jax.evaluation.evaluate import IMAGES
from petsr_jax.evaluation.predict import predict_slices

# Tissue label code of grey matter in <root>/labels/ (petsr_jax.data, petsr_jax.sim.LABELS).
GREY_MATTER_LABEL = 1


def _percent_of(error: float, true_value: float) -> float | None:
    return 100.0 * error / true_value if true_value > 0 else None


def region_rows(
    truth: np.ndarray,
    images: dict[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    lesions: np.ndarray | None = None,
    patient: str = "",
    units: str = "unknown",
) -> list[dict]:
    """Activity recovery of each region: grey matter (labels == 1) and every lesion 1..K.

    For each region and image (e.g. "bicubic", "sr"): the regional mean and maximum, their error
    against `truth` (image − truth, in `units`) and that error as % of the true value (None when
    the true value is not positive). Mean and maximum are what a reader measures on a scan
    (SUVmean / SUVmax): smoothing lowers a small hot lesion's maximum long before its mean.
    Regions without voxels are skipped. All arrays share one grid.
    """
    regions = []
    if labels is not None and np.any(labels == GREY_MATTER_LABEL):
        regions.append(("grey_matter", "grey_matter", labels == GREY_MATTER_LABEL))
    if lesions is not None:
        for k in np.unique(lesions[lesions > 0]):
            regions.append((f"lesion_{int(k)}", "lesion", lesions == k))
    rows = []
    for name, kind, region in regions:
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
        rows.append(row)
    return rows


def summarise_regions(rows: list[dict], images: tuple[str, ...] = IMAGES) -> dict:
    """Per region kind and image: count, mean signed and mean absolute % errors of mean and max."""
    summary = {}
    for kind in sorted({row["kind"] for row in rows}):
        members = [row for row in rows if row["kind"] == kind]
        entry: dict = {"count": len(members)}
        for image in images:
            stats = {}
            for key in ("mean_error_pct", "max_error_pct"):
                values = [r[image][key] for r in members if r[image][key] is not None]
                stats[key] = float(np.mean(values)) if values else None
                stats[f"abs_{key}"] = float(np.mean(np.abs(values))) if values else None
            entry[image] = stats
        summary[kind] = entry
    return summary


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
        if scan.labels is not None:
            present |= scan.labels == GREY_MATTER_LABEL
        if scan.lesions is not None:
            present |= scan.lesions > 0
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


def summary_lines(regional: dict | None) -> list[str]:
    """Markdown lines of a run's regional recovery (`results["regional"]`); none without it."""
    if not regional:
        return []
    lines = [
        "",
        f"Regional activity recovery (test patients, % of the true value, {regional['units']}):",
        "",
        "| region | n | image | mean error % | max error % | |mean error| % | |max error| % |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ("mean_error_pct", "max_error_pct", "abs_mean_error_pct", "abs_max_error_pct")
    for kind, entry in sorted(regional["summary"].items()):
        for image in IMAGES:
            stats = entry[image]
            cells = ["n/a" if stats[k] is None else f"{stats[k]:.1f}" for k in keys]
            lines.append(f"| {kind} | {entry['count']} | {image} | " + " | ".join(cells) + " |")
    return lines
