"""Evaluation: the model's output and the bicubic input, both against the original.

`evaluate` runs a split's slices through one jitted function that degrades, super-resolves and
scores each slice, so training, evaluation and reports share the single `degrade()`. What is
scored follows the run's data domain (`data.domain`, see `petsr_jax.data.Domain`):

* "physical" — slices as each volume divided by its maximum: PSNR and SSIM (Gaussian window)
  over the whole slice and inside the brain mask, LPIPS on the images clipped to [0, 1].
  Without a brain mask for every patient there are no "brain" scores: whole-slice numbers under
  a "brain" name would pass for something they are not.
* "paper" — the authors' protocol: each slice min–max scaled to 8 bits, the input degraded as
  PIL resizes 8-bit images, the output stored as an 8-bit image (`store_8bit`); PSNR on /255
  images with data range 1, SSIM with scikit-image's defaults (`window="uniform"`), LPIPS(VGG)
  — the numbers to set beside the paper's Tables 1–3. The same outputs mapped back per slice
  (`Domain.decode`) are also scored as in "physical" (`psnr_physical`, `ssim_physical`,
  `psnr_brain`, `ssim_brain`), so one trained model gives both tables.

LPIPS is added when its weights are available; otherwise the reason is recorded and every other
number is still reported. `summarise` turns per-slice scores into mean ± std over slices and
per-patient means.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from petsr_jax import metrics
from petsr_jax.data.degrade import store_8bit
from petsr_jax.evaluation.predict import jit_on_mesh, jitted_predict, make_predict_fn, map_batches

log = logging.getLogger(__name__)

IMAGES = ("bicubic", "sr")


def _physical_scores(out, images, hr, mask):
    """PSNR / SSIM (Gaussian window) of each image, whole slice and inside `mask` (if any)."""
    for name, img in images:
        out[f"{name}/psnr"] = metrics.psnr(img, hr)
        out[f"{name}/ssim"] = metrics.ssim(img, hr)
        if mask is None:
            continue
        out[f"{name}/psnr_brain"] = metrics.psnr(img, hr, mask)
        out[f"{name}/ssim_brain"] = metrics.ssim(img, hr, mask)


def make_score_fn(model, task, mesh):
    """A jitted `score(params, batch) -> {"<image>/<metric>": [N]}` with the batch sharded.

    `batch` holds `hr` (in the task's domain), `mask` when the slices have a brain mask, and
    for "paper" also `low`, `span` (`Domain.encode`) and `hr_volume`, the slices before
    encoding. Both images are scored against the task's target: `hr` itself for the paper's
    bicubic task, the finer noise-free image for a scanner task. "bicubic" names the
    network's input, whichever degradation made it.
    """
    predict = make_predict_fn(model, task)
    domain = task.degradation.domain

    def score(params, batch):
        hr, mask = batch["hr"], batch.get("mask")
        lr_up, sr, target = predict(params, batch)
        out = {}
        if not domain.eight_bit:
            _physical_scores(out, (("bicubic", lr_up), ("sr", sr)), target, mask)
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

    return jit_on_mesh(score, mesh)


def _score_inputs(slices, domain) -> dict[str, np.ndarray]:
    """What the score function reads per slice of a `SliceSet` (`make_score_fn`)."""
    volume = np.asarray(slices.hr, np.float32)
    hr, low, span = domain.encode(volume)
    # `index` fixes each slice's draw of a stochastic degradation (`Task.eval_keys`).
    inputs = {"hr": hr[..., None], "index": np.arange(len(hr), dtype=np.int32)}
    if slices.mask is not None:
        inputs["mask"] = np.asarray(slices.mask)[..., None]
    if getattr(slices, "guide", None) is not None:  # an MR-guided run's T1 (and coordinates)
        inputs["guide"] = slices.guide
    if getattr(slices, "context", None) is not None:  # neighbouring slices (2.5D, 3D PSF)
        inputs["context"] = slices.context
    if domain.eight_bit:
        inputs.update(low=low, span=span, hr_volume=volume[..., None])
    return inputs


def evaluate(
    params,
    slices,
    *,
    model,
    task,
    mesh,
    batch_size: int = 8,
    lpips_weights: str | None = None,
    with_lpips: bool = False,
    progress=None,
) -> dict:
    """Per-slice scores of a `SliceSet`: `{"bicubic/psnr": [N], ..., "sr/lpips": [N]}`.

    Without a brain mask there are no "brain" scores. With `with_lpips`, LPIPS
    is computed on the images the other metrics see, clipped to [0, 1]; when unavailable the
    dict holds `"lpips_unavailable": reason` instead.
    """
    domain = task.degradation.domain
    inputs = _score_inputs(slices, domain)
    run = functools.partial(map_batches, batch_size=batch_size, mesh=mesh)
    result = dict(run(_score_fn(model, task, mesh), params, inputs, progress=progress) or {})
    if not with_lpips:
        return result
    # Every process runs the prediction, weights or not: it is one collective program, and a
    # process that skipped it would leave the others waiting.
    predict_inputs = {k: v for k, v in inputs.items() if k in ("hr", "guide", "context", "index")}
    lr_up, sr, target = run(jitted_predict(model, task, mesh), params, predict_inputs)
    lpips_fn, reason = _lpips_fn(lpips_weights)
    if lpips_fn is None:
        result["lpips_unavailable"] = reason
        return result
    if domain.eight_bit:
        sr = np.asarray(store_8bit(sr))
    hr = np.clip(target, 0, 1)
    for name, image in (("bicubic", lr_up), ("sr", sr)):
        result[f"{name}/lpips"] = np.concatenate(
            [
                np.asarray(
                    lpips_fn(np.clip(image[k : k + batch_size], 0, 1), hr[k : k + batch_size])
                )
                for k in range(0, len(hr), batch_size)
            ]
        )
    return result


def evaluate_run(
    params, slices, config, *, model, task, mesh, with_lpips: bool | None = None
) -> dict:
    """`evaluate` with a run config's evaluation batch size and LPIPS settings."""
    return evaluate(
        params,
        slices,
        model=model,
        task=task,
        mesh=mesh,
        batch_size=config.eval.batch_size,
        with_lpips=config.eval.lpips if with_lpips is None else with_lpips,
        lpips_weights=config.eval.lpips_weights or None,
    )


@functools.lru_cache(maxsize=16)
def _score_fn(model, task, mesh):
    return make_score_fn(model, task, mesh)


def _lpips_fn(weights_dir):
    """(callable, None) when LPIPS weights are found, else (None, reason)."""
    try:
        from petsr_jax.metrics import perceptual as lpips_module

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
