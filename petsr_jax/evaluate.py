"""Evaluation: the model's output and the bicubic input, both against the original.

`evaluate` runs a split's slices through one jitted function that degrades, super-resolves and
scores each slice (PSNR and SSIM over the whole slice and inside the brain mask), so training,
evaluation and reports share the single `degrade()`. LPIPS is added when its weights are
available; otherwise the reason is recorded and every other number is still reported.
`summarise` turns per-slice scores into mean ± std over slices and per-patient means.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from petsr_jax import metrics, sharding
from petsr_jax.degrade import degrade

log = logging.getLogger(__name__)

IMAGES = ("bicubic", "sr")


def make_predict_fn(model, scale: int):
    """`predict(params, hr) -> (lr_up, sr)` for NHWC high-resolution slices (not jitted)."""

    def predict(params, hr):
        lr_up = degrade(hr, scale)
        sr = model.apply({"params": params}, lr_up)
        return lr_up, sr

    return predict


def make_score_fn(model, scale: int, mesh):
    """A jitted `score(params, hr, mask) -> {"<image>/<metric>": [N]}` with the batch sharded."""
    predict = make_predict_fn(model, scale)

    def score(params, hr, mask):
        lr_up, sr = predict(params, hr)
        out = {}
        for name, img in (("bicubic", lr_up), ("sr", sr)):
            out[f"{name}/psnr"] = metrics.psnr(img, hr)
            out[f"{name}/ssim"] = metrics.ssim(img, hr)
            out[f"{name}/psnr_brain"] = metrics.psnr(img, hr, mask)
            out[f"{name}/ssim_brain"] = metrics.ssim(img, hr, mask)
        return out

    rep = sharding.replicated(mesh)
    data = sharding.batch_sharded(mesh)
    return jax.jit(score, in_shardings=(rep, data, data), out_shardings=rep)


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


def evaluate(
    params,
    slices,
    *,
    model,
    scale: int,
    mesh,
    batch_size: int = 8,
    lpips_weights: str | None = None,
    with_lpips: bool = False,
    progress=None,
) -> dict:
    """Per-slice scores of a `SliceSet`: `{"bicubic/psnr": [N], ..., "sr/lpips": [N]}`.

    Without a brain mask the "brain" scores are over the whole slice. With `with_lpips`, LPIPS
    is computed on images clipped to [0, 1]; when unavailable the dict holds
    `"lpips_unavailable": reason` instead.
    """
    score = _score_fn(model, scale, mesh)
    predict = _predict_fn(model, scale, mesh) if with_lpips else None
    lpips_fn, lpips_reason = _lpips_fn(lpips_weights) if with_lpips else (None, None)
    n = len(slices)
    out: dict[str, list] = {}
    for start, stop, size in _padded_batches(n, batch_size, mesh.size):
        hr = _pad(np.asarray(slices.hr[start:stop], np.float32)[..., None], size)
        if slices.mask is not None:
            mask = _pad(np.asarray(slices.mask[start:stop])[..., None], size)
        else:
            mask = np.ones_like(hr, dtype=bool)
        hr_g = sharding.full_batch_to_global(hr, mesh)
        mask_g = sharding.full_batch_to_global(mask, mesh)
        scores = score(params, hr_g, mask_g)
        for k, v in scores.items():
            out.setdefault(k, []).append(np.asarray(v)[: stop - start])
        if lpips_fn is not None:
            lr_up, sr = predict(params, hr_g)
            hr_c = np.clip(hr, 0, 1)
            for name, img in (("bicubic", lr_up), ("sr", sr)):
                v = lpips_fn(np.clip(np.asarray(img), 0, 1), hr_c)
                out.setdefault(f"{name}/lpips", []).append(np.asarray(v)[: stop - start])
        if progress is not None:
            progress(stop - start)
    result = {k: np.concatenate(v) for k, v in out.items()}
    if with_lpips and lpips_fn is None:
        result["lpips_unavailable"] = lpips_reason
    return result


@functools.lru_cache(maxsize=16)
def _score_fn(model, scale, mesh):
    return make_score_fn(model, scale, mesh)


@functools.lru_cache(maxsize=16)
def _predict_fn(model, scale, mesh):
    rep = sharding.replicated(mesh)
    return jax.jit(
        make_predict_fn(model, scale),
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


def predict_slices(params, hr: np.ndarray, *, model, scale: int, mesh):
    """(lr_up, sr) as numpy for a few [N, H, W] slices (figures)."""
    predict = _predict_fn(model, scale, mesh)
    size = -(-hr.shape[0] // mesh.size) * mesh.size
    batch = _pad(np.asarray(hr, np.float32)[..., None], size)
    lr_up, sr = predict(params, sharding.full_batch_to_global(batch, mesh))
    n = hr.shape[0]
    return np.asarray(lr_up)[:n, ..., 0], np.asarray(sr)[:n, ..., 0]


def jnp_finite(tree) -> bool:
    """True when every leaf of a pytree is finite (checked before a checkpoint is written)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))
