"""How hard a cohort is for bicubic interpolation, measured the way the paper's authors did.

Examples, one per use:

  python launch/cohort_difficulty.py --preset=paper                  # the embedded cohort
  python launch/cohort_difficulty.py --preset=paper --patients=5     # a quick subset
  python launch/cohort_difficulty.py --root=/data/my_pet --scales=8,12,16

Why. The paper's bicubic rows (Tables 1–3: 30.53 / 25.97 / 22.80 dB PSNR, SSIM 0.889 / 0.796 /
0.699 at 8× / 12× / 16×) describe its data, not a method: they say how much fine structure and
noise the 384² slices hold. A synthetic cohort that is to stand in for those data should give
about the same rows, and this script checks that with libraries independent of the project's
JAX code (PIL for the bicubic, scikit-image for the metrics), following the authors' pipeline:

- per patient, the 49 slices with the largest brain-mask area (the paper's 49 of 89 "brain"
  slices; all slices where a volume has fewer; without a mask, all slices);
- each slice min–max scaled to 8 bits, `round((x - min) / (max - min) · 255)` (the authors'
  code also lets the brightest pixel overflow to 0; that accident is not reproduced);
- a PIL 'L' image, `resize((w // s, h // s), BICUBIC)` then `resize((w, h), BICUBIC)`;
- PSNR and SSIM on the /255 images with data range 1, scikit-image's defaults (SSIM: 7×7
  uniform window), averaged over all slices of all patients (the paper's tables are means over
  test slices).

The output is a markdown table with the paper's numbers beside.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The paper's bicubic baselines (Tables 1–3): scale → (PSNR dB, SSIM).
PAPER_BICUBIC = {8: (30.53, 0.889), 12: (25.97, 0.796), 16: (22.799, 0.699)}
EVAL_SLICES = 49
_AUX_FOLDERS = ("masks", "t1", "labels", "lesions")


def to_uint8(image: np.ndarray) -> np.ndarray | None:
    """Min–max scale a slice to 0..255 (rounded); None for a constant slice."""
    image = np.asarray(image, np.float64)
    low, high = float(image.min()), float(image.max())
    if not high > low:
        return None
    return np.round((image - low) / (high - low) * 255.0).astype(np.uint8)


def bicubic_scores(hr8: np.ndarray, scale: int) -> tuple[float, float]:
    """(PSNR dB, SSIM) of PIL's bicubic down ×`scale` and back up against the 8-bit slice."""
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    h, w = hr8.shape
    img = Image.fromarray(np.ascontiguousarray(hr8, np.uint8))  # mode "L"
    up = img.resize((w // scale, h // scale), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    hr = hr8.astype(np.float64) / 255.0
    sr = np.asarray(up, np.float64) / 255.0
    return (
        float(peak_signal_noise_ratio(hr, sr, data_range=1)),
        float(structural_similarity(hr, sr, data_range=1)),
    )


def brain_slices(volume: np.ndarray, mask: np.ndarray | None, n: int = EVAL_SLICES) -> np.ndarray:
    """Indices (ascending) of the `n` slices with the largest brain-mask area."""
    count = volume.shape[0]
    if mask is None or n >= count:
        return np.arange(count)
    area = np.asarray(mask).reshape(count, -1).astype(bool).sum(axis=1)
    return np.sort(np.argsort(-area, kind="stable")[:n])


def volume_scores(
    volume: np.ndarray, mask: np.ndarray | None, scales=(8, 12, 16)
) -> dict[int, np.ndarray]:
    """Per scale, `[slices, 2]` (PSNR, SSIM) of a volume's brain slices."""
    out: dict[int, list] = {s: [] for s in scales}
    for k in brain_slices(volume, mask):
        hr8 = to_uint8(volume[k])
        if hr8 is None:
            continue
        for s in scales:
            out[s].append(bicubic_scores(hr8, s))
    return {s: np.asarray(v, np.float64).reshape(-1, 2) for s, v in out.items()}


def patient_ids(root: Path) -> list[str]:
    """Patient ids of a data root: cohort.json's order where there is one, else sorted entries."""
    description = root / "cohort.json"
    if description.is_file():
        return [p["patient_id"] for p in json.loads(description.read_text())["patients"]]
    ids = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in _AUX_FOLDERS:
            continue
        if entry.is_dir():
            ids.append(entry.name)
        elif entry.name.endswith((".nii.gz", ".nii")):
            ids.append(entry.name.removesuffix(".gz").removesuffix(".nii"))
    return ids


def load(root: Path, pid: str) -> tuple[np.ndarray, np.ndarray | None]:
    from petsr_jax import io

    path = root / pid
    if not path.is_dir():
        path = next(p for p in (root / f"{pid}.nii.gz", root / f"{pid}.nii") if p.is_file())
    volume = io.read_volume(path).data
    mask = None
    for ext in (".nii.gz", ".nii"):
        f = root / "masks" / f"{pid}{ext}"
        if f.is_file():
            mask = io.read_nifti_array(f)[0] > 0
            break
    return volume, mask


def measure_root(root, scales=(8, 12, 16), patients: int | None = None, log=print):
    """Per scale, all brain slices' `[slices, 2]` (PSNR, SSIM) over a root's (first) patients."""
    root = Path(root)
    ids = patient_ids(root)[:patients] if patients else patient_ids(root)
    scores: dict[int, list] = {s: [] for s in scales}
    for pid in ids:
        volume, mask = load(root, pid)
        result = volume_scores(volume, mask, scales)
        for s in scales:
            scores[s].append(result[s])
        parts = [f"{s}× {v[:, 0].mean():.2f} dB {v[:, 1].mean():.3f}" for s, v in result.items()]
        log(f"{pid}: " + "  ".join(parts))
    return {s: np.concatenate(v) for s, v in scores.items()}, len(ids)


def table(scores: dict[int, np.ndarray]) -> str:
    lines = [
        "| scale | slices | PSNR (dB) | paper | Δ | SSIM | paper | Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, v in scores.items():
        psnr, ssim = v[:, 0].mean(), v[:, 1].mean()
        paper = PAPER_BICUBIC.get(s)
        if paper:
            ref = f"{paper[0]:.2f} | {psnr - paper[0]:+.2f} | {ssim:.3f} | {paper[1]:.3f} | "
            ref += f"{ssim - paper[1]:+.3f} |"
        else:
            ref = f"– | – | {ssim:.3f} | – | – |"
        lines.append(f"| {s}× | {len(v)} | {psnr:.2f} | {ref}")
    return "\n".join(lines)


def main(argv):
    del argv
    from petsr_jax import sim

    scales = tuple(int(s) for s in _SCALES.value)
    if _ROOT.value:
        root = Path(_ROOT.value)
    else:
        root = sim.ensure_cohort(_PRESET.value, seed=_SEED.value)
    scores, n = measure_root(root, scales, _PATIENTS.value)
    print(f"\n{root}: {n} patients, bicubic down and up (PIL), 8-bit min–max slices\n")
    print(table(scores))


if __name__ == "__main__":
    from absl import flags

    from petsr_jax import cli

    _ROOT = flags.DEFINE_string("root", None, "Data root (default: the embedded --preset cohort).")
    _PRESET = flags.DEFINE_string("preset", "paper", "Embedded cohort preset (without --root).")
    _SEED = flags.DEFINE_integer("seed", 0, "Embedded cohort seed (without --root).")
    _SCALES = flags.DEFINE_list("scales", ["8", "12", "16"], "Downscaling factors.")
    _PATIENTS = flags.DEFINE_integer("patients", None, "Measure only the first N patients.")
    cli.run(
        main,
        usage="[--preset=paper|small|tiny | --root=<data root>] [--scales=8,12,16]",
        example="python launch/cohort_difficulty.py --preset=paper --patients=5",
    )
