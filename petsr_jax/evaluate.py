"""Evaluation: the model's output and the bicubic input, both against the original.

`evaluate` runs a split's slices through one jitted function that degrades, super-resolves and
scores each slice, so training, evaluation and reports share the single `degrade()`. What is
scored follows the run's data domain (`data.domain`, see `petsr_jax.data.to_domain`):

* "physical" — slices as each volume divided by its maximum: PSNR and SSIM (Gaussian window)
  over the whole slice and inside the brain mask, LPIPS on the images clipped to [0, 1].
* "paper" — the authors' protocol: each slice min–max scaled to 8 bits, the input degraded as
  PIL resizes 8-bit images, the output stored as an 8-bit image (`store_8bit`); PSNR on /255
  images with data range 1, SSIM with scikit-image's defaults (`window="uniform"`), LPIPS(VGG)
  — the numbers to set beside the paper's Tables 1–3. The same outputs mapped back per slice
  (`data.from_domain`) are also scored as in "physical" (`psnr_physical`, `ssim_physical`,
  `psnr_brain`, `ssim_brain`), so one trained model gives both tables.

LPIPS is added when its weights are available; otherwise the reason is recorded and every other
number is still reported. `summarise` turns per-slice scores into mean ± std over slices and
per-patient means. `regional_recovery` answers the clinical question in physical units: how far
bicubic and SR move the mean and maximum activity of grey matter and of each lesion.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from petsr_jax import data, metrics, sharding
from petsr_jax.data.degrade import degrade, store_8bit

log = logging.getLogger(__name__)

IMAGES = ("bicubic", "sr")


def make_predict_fn(model, scale: int, domain: str = "physical"):
    """`predict(params, hr) -> (lr_up, sr)` for NHWC slices in `domain` (not jitted)."""

    def predict(params, hr):
        lr_up = degrade(hr, scale, domain)
        sr = model.apply({"params": params}, lr_up)
        return lr_up, sr

    return predict


def _physical_scores(out, images, hr, mask):
    """PSNR / SSIM (Gaussian window) of each image, whole slice and inside `mask`."""
    for name, img in images:
        out[f"{name}/psnr"] = metrics.psnr(img, hr)
        out[f"{name}/ssim"] = metrics.ssim(img, hr)
        out[f"{name}/psnr_brain"] = metrics.psnr(img, hr, mask)
        out[f"{name}/ssim_brain"] = metrics.ssim(img, hr, mask)


def make_score_fn(model, scale: int, mesh, domain: str = "physical"):
    """A jitted `score(params, batch) -> {"<image>/<metric>": [N]}` with the batch sharded.

    `batch` holds `hr` (in `domain`), `mask`, and for "paper" also `low`, `span` (`to_domain`)
    and `hr_volume`, the slices before `to_domain`.
    """
    predict = make_predict_fn(model, scale, domain)

    def score(params, batch):
        hr, mask = batch["hr"], batch["mask"]
        lr_up, sr = predict(params, hr)
        out = {}
        if domain == "physical":
            _physical_scores(out, (("bicubic", lr_up), ("sr", sr)), hr, mask)
            return out
        images = (("bicubic", lr_up), ("sr", store_8bit(sr)))
        for name, img in images:
            out[f"{name}/psnr"] = metrics.psnr(img, hr)
            out[f"{name}/ssim"] = metrics.ssim(img, hr, window="uniform")
        low, span = batch["low"][:, None, None, None], batch["span"][:, None, None, None]
        physical = {}
        _physical_scores(
            physical,
            [(name, low + span * img) for name, img in images],
            batch["hr_volume"],
            mask,
        )
        for key, value in physical.items():
            image, metric = key.split("/")
            if metric in ("psnr", "ssim"):
                metric += "_physical"
            out[f"{image}/{metric}"] = value
        return out

    rep = sharding.replicated(mesh)
    return jax.jit(score, in_shardings=(rep, sharding.batch_sharded(mesh)), out_shardings=rep)


def _padded_batches(n: int, batch_size: int, multiple: int):
    """(start, stop, padded_size) covering n items; padded sizes divide over the devices."""
    batch_size = -(-batch_size // multiple) * multiple
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield start, stop, -(-(stop - start) // multiple) * multiple


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    pad = np.zeros((size - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def _score_batch(slices, start: int, stop: int, size: int, domain: str) -> dict:
    """Host arrays of one evaluation batch of a `SliceSet`, padded to `size` slices."""
    volume = np.asarray(slices.hr[start:stop], np.float32)
    hr, low, span = data.to_domain(volume, domain)
    if slices.mask is not None:
        mask = np.asarray(slices.mask[start:stop])[..., None]
    else:
        mask = np.ones(hr.shape + (1,), bool)
    batch = {"hr": hr[..., None], "mask": mask}
    if domain != "physical":
        batch.update(low=low, span=span, hr_volume=volume[..., None])
    return {k: _pad(v, size) for k, v in batch.items()}


def evaluate(
    params,
    slices,
    *,
    model,
    scale: int,
    mesh,
    batch_size: int = 8,
    domain: str = "physical",
    lpips_weights: str | None = None,
    with_lpips: bool = False,
    progress=None,
) -> dict:
    """Per-slice scores of a `SliceSet`: `{"bicubic/psnr": [N], ..., "sr/lpips": [N]}`.

    Without a brain mask the "brain" scores are over the whole slice. With `with_lpips`, LPIPS
    is computed on the images the other metrics see, clipped to [0, 1]; when unavailable the
    dict holds `"lpips_unavailable": reason` instead.
    """
    score = _score_fn(model, scale, mesh, domain)
    predict = _predict_fn(model, scale, mesh, domain) if with_lpips else None
    lpips_fn, lpips_reason = _lpips_fn(lpips_weights) if with_lpips else (None, None)
    n = len(slices)
    out: dict[str, list] = {}
    for start, stop, size in _padded_batches(n, batch_size, mesh.size):
        batch = _score_batch(slices, start, stop, size, domain)
        batch_g = {k: sharding.full_batch_to_global(v, mesh) for k, v in batch.items()}
        scores = score(params, batch_g)
        for k, v in scores.items():
            out.setdefault(k, []).append(np.asarray(v)[: stop - start])
        if with_lpips:
            # Every process runs the prediction, weights or not: it is one collective program,
            # and a process that skipped it would leave the others waiting.
            lr_up, sr = predict(params, batch_g["hr"])
        if lpips_fn is not None:
            hr_c = np.clip(batch["hr"], 0, 1)
            sr = np.asarray(sr) if domain == "physical" else np.asarray(store_8bit(sr))
            for name, img in (("bicubic", np.asarray(lr_up)), ("sr", sr)):
                v = lpips_fn(np.clip(img, 0, 1), hr_c)
                out.setdefault(f"{name}/lpips", []).append(np.asarray(v)[: stop - start])
        if progress is not None:
            progress(stop - start)
    result = {k: np.concatenate(v) for k, v in out.items()}
    if with_lpips and lpips_fn is None:
        result["lpips_unavailable"] = lpips_reason
    return result


def evaluate_run(params, slices, config, *, model, mesh, with_lpips: bool | None = None) -> dict:
    """`evaluate` with a run config's scale, evaluation batch size and LPIPS settings."""
    return evaluate(
        params,
        slices,
        model=model,
        scale=config.scale,
        mesh=mesh,
        batch_size=config.eval.batch_size,
        domain=config.data.domain,
        with_lpips=config.eval.lpips if with_lpips is None else with_lpips,
        lpips_weights=config.eval.lpips_weights or None,
    )


@functools.lru_cache(maxsize=16)
def _score_fn(model, scale, mesh, domain):
    return make_score_fn(model, scale, mesh, domain)


@functools.lru_cache(maxsize=16)
def _predict_fn(model, scale, mesh, domain="physical"):
    rep = sharding.replicated(mesh)
    return jax.jit(
        make_predict_fn(model, scale, domain),
        in_shardings=(rep, sharding.batch_sharded(mesh)),
        out_shardings=rep,
    )


def _lpips_fn(weights_dir):
    """(callable, None) when LPIPS weights are found, else (None, reason)."""
    try:
        from petsr_jax import lpips as lpips_module

        metric = lpips_module.LPIPSMetric(weights_dir or None)
    except Exception as e:  # LPIPSUnavailable, or a broken weights file: report, don't guess
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("LPIPS unavailable: %s", e)
        return None, reason
    return metric, None


def summarise(scores: dict, patients: np.ndarray) -> dict:
    """Mean ± std over slices and per-patient means of each `image/metric` score."""
    summary: dict = {}
    for key, values in scores.items():
        if not isinstance(values, np.ndarray):
            summary[key] = values
            continue
        image, metric = key.split("/")
        entry = summary.setdefault(image, {})
        entry[metric] = float(np.mean(values))
        entry[f"{metric}_std"] = float(np.std(values))
        per_patient = summary.setdefault("per_patient", {})
        for pid in np.unique(patients):
            per_patient.setdefault(str(pid), {}).setdefault(image, {})[metric] = float(
                np.mean(values[patients == pid])
            )
    summary["num_slices"] = int(len(patients))
    summary["num_patients"] = int(len(np.unique(patients)))
    return summary


def predict_slices(params, hr: np.ndarray, *, model, scale: int, mesh, domain="physical"):
    """(lr_up, sr) as numpy for a few [N, H, W] slices (figures), in the units of `hr`: the
    network runs in `domain` (`data.to_domain`) and its images are mapped back."""
    predict = _predict_fn(model, scale, mesh, domain)
    encoded, low, span = data.to_domain(hr, domain)
    size = -(-hr.shape[0] // mesh.size) * mesh.size
    batch = _pad(encoded[..., None], size)
    lr_up, sr = predict(params, sharding.full_batch_to_global(batch, mesh))
    n = hr.shape[0]
    return tuple(data.from_domain(np.asarray(img)[:n, ..., 0], low, span) for img in (lr_up, sr))


def jnp_finite(tree) -> bool:
    """True when every leaf of a pytree is finite (checked before a checkpoint is written)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


# --------------------------------------------------------------------------------------------
# Regional recovery in physical units
# --------------------------------------------------------------------------------------------

# Tissue label code of grey matter in <root>/labels/ (petsr_jax.data, petsr_jax.cohort.LABELS).
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


def _predict_in_batches(params, hr: np.ndarray, *, model, scale, mesh, batch_size, domain):
    """(lr_up, sr) numpy `[N, H, W]` for normalised slices, `batch_size` slices per call."""
    parts = [
        predict_slices(
            params,
            hr[start : start + batch_size],
            model=model,
            scale=scale,
            mesh=mesh,
            domain=domain,
        )
        for start in range(0, hr.shape[0], batch_size)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def regional_recovery(
    params,
    root,
    patient_ids,
    *,
    model,
    scale: int,
    mesh,
    batch_size: int = 8,
    domain: str = "physical",
) -> dict:
    """Bicubic and SR activity in grey matter and lesions against the original, physical units.

    For each patient of `root` (a data root with labels/ and/or lesions/ maps), the volume is
    degraded by `scale` and super-resolved as in evaluation (normalised by its maximum, taken
    into the run's `domain` and back), on the slices that hold a region. Returns `"rows"` (one
    row per patient and region, see `region_rows`), `"summary"` (see `summarise_regions`),
    `"units"` and `"skipped"` (patients without any region map).
    """
    from pathlib import Path

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
        lr_up, sr = _predict_in_batches(
            params,
            hr[keep],
            model=model,
            scale=scale,
            mesh=mesh,
            batch_size=batch_size,
            domain=domain,
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
