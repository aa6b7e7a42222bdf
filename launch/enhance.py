"""Apply a trained model to scans and write the results as new DICOM series and/or NIfTI files.

python launch/enhance.py --workdir=runs/deepsr_x8 --input=scan_dicom/ --output=enhanced/
python launch/enhance.py --workdir=runs/deepsr_x8 --input=patients/ --output=out/ \
    --mode=reconstruct --format=both
python launch/enhance.py --workdir=runs/deepsr_x8_mr --input=pet/ --mr=t1.nii.gz --output=out/

--input is a DICOM series folder, a NIfTI file, or a folder of patients (one DICOM folder or
NIfTI file each, as a data root). Each patient gets `<output>/<name>/` (DICOM) and/or
`<output>/<name>.nii.gz`, in the input's physical units and geometry. --mode=enhance applies the
network to the scan as it is; --mode=reconstruct degrades it by the model's scale first and
prints PSNR / SSIM of bicubic and SR against the original. Everything that would be refused (an
output inside the input, an existing output, an input of another quantity than the training data) is
refused before the first file is written. A scan in other units than the training data is
enhanced when the two differ by a constant factor (SUVbw vs Bq/mL: normalisation removes it),
with a warning; another modality or quantity (a parametric map...) is refused unless
--allow_units. Outputs hold no negative activity (clipped at 0), and each scan's change of total
and maximum activity against its input is printed and recorded in
`<output>/activity_changes.json`. A model trained with MR guidance (the `mr` config
flag) needs --mr, the scan's co-registered T1 (a DICOM series folder or NIfTI file on the PET's
grid); any other model refuses --mr.
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags (no-op on GPUs)

import sys  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from petsr_jax import checkpoint, data, inference, io, metrics, quantitation  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).")
_INPUT = flags.DEFINE_string("input", None, "DICOM series folder, NIfTI file or patients folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder that receives one output per patient.")
_MODE = flags.DEFINE_enum(
    "mode", "enhance", inference.MODES, "enhance: the scan as it is; reconstruct: degrade first."
)
_FORMAT = flags.DEFINE_enum(
    "format", "auto", inference.FORMATS, "Output format; auto = the format of each input scan."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Slices per device call (0 = the run's eval.batch_size)."
)
_MR = flags.DEFINE_string(
    "mr",
    None,
    "Co-registered T1 (DICOM series folder or NIfTI) of a single --input scan, for "
    "a model trained with MR guidance.",
)
_ALLOW_UNITS = flags.DEFINE_bool(
    "allow_units",
    False,
    "Enhance a scan whose modality or units hold another quantity than the training data's "
    "(e.g. a parametric map), which is refused otherwise. A change of unit (SUVbw, kBq/mL) "
    "never needs it.",
)
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint",
    None,
    ("best", "last"),
    "Which params to use (default: those the run scored, its eval.weights).",
)


def reconstruction_scores(hr, bicubic, sr) -> dict[str, float]:
    """Mean PSNR / SSIM over slices of normalised [N, H, W] arrays, whole slice, vs `hr`.

    All-zero slices of the original (air above the head) are left out: their PSNR is infinite
    for bicubic and says nothing about the model.
    """
    keep = np.flatnonzero(np.asarray(hr).reshape(len(hr), -1).max(axis=1) > 0)
    scores = {"slices": int(len(keep))}
    if not len(keep):
        return scores
    hr_k = hr[keep][..., None]
    for name, image in (("bicubic", bicubic), ("sr", sr)):
        scores[f"{name}/psnr"] = float(np.mean(metrics.psnr(image[keep][..., None], hr_k)))
        if min(hr.shape[1:]) >= metrics.SSIM_WINDOW:
            scores[f"{name}/ssim"] = float(np.mean(metrics.ssim(image[keep][..., None], hr_k)))
    return scores


def _format_scores(name: str, scores: dict) -> str:
    cells = [f"{name:<24} {scores['slices']:>6}"]
    for key in ("bicubic/psnr", "sr/psnr", "bicubic/ssim", "sr/ssim"):
        value = scores.get(key)
        cells.append(f"{value:>12.4f}" if value is not None else f"{'n/a':>12}")
    return " ".join(cells)


def _pooled(all_scores: list[tuple[str, dict]]) -> dict:
    """Per-patient means pooled into a mean over every scored slice."""
    total = sum(scores["slices"] for _, scores in all_scores)
    pooled = {"slices": total}
    for key in ("bicubic/psnr", "sr/psnr", "bicubic/ssim", "sr/ssim"):
        parts = [(s[key], s["slices"]) for _, s in all_scores if key in s]
        if parts and total:
            pooled[key] = sum(v * n for v, n in parts) / sum(n for _, n in parts)
    return pooled


def _enhance_one(sr, volume, mode: str, progress, t1=None) -> tuple[io.Volume, dict | None]:
    """The output volume of one patient and, in reconstruct mode, its scores."""
    # The network's range, as training saw it: the volume divided by its maximum.
    normalised, factor = data.normalise(volume.data)
    guide = sr.guide_for(t1, volume)
    if mode == "enhance":
        restored = sr.enhance_normalised(normalised, progress=progress, guide=guide)
        scores = None
    else:
        bicubic, restored = sr.reconstruct_normalised(normalised, progress=progress, guide=guide)
        scores = reconstruction_scores(normalised, bicubic, restored)
    # Activity is never negative; the clipped voxels are counted for the report.
    activity, clipped = quantitation.clip_negative(data.denormalise(restored, factor))
    return volume.replace(data=activity, meta={**volume.meta, "clipped_voxels": clipped}), scores


def _write(job, volume, description: str) -> list[str]:
    """Every format asked for, all or none: a failed NIfTI leaves no DICOM to block a rerun."""
    written = io.write_outputs(
        volume,
        dicom_dir=job.dicom_dir,
        nifti_path=job.nifti_path,
        series_description=description,
        series_number=inference.series_number(volume),
    )
    return [str(path) for path in written]


def _report_activity(name: str, source, result, output_dir) -> None:
    """Print how enhancement changed the scan's total and maximum activity, and record it in
    `<output>/activity_changes.json` (updated after each scan, so it matches what is on disk)."""
    change = quantitation.activity_change(
        source.data,
        result.data,
        units=source.units,
        clipped_voxels=result.meta.get("clipped_voxels", 0),
    )
    path = quantitation.record_changes(output_dir, {name: change})
    tqdm.write(f"{name}: activity vs input: {change.summary()} (recorded in {path})")


def _read_t1(mr_path, jobs) -> io.Volume | None:
    """The T1 given with --mr, which names the T1 of one scan."""
    if mr_path is None:
        return None
    if len(jobs) != 1:
        raise inference.InferenceError(
            f"--mr={mr_path} is the T1 of one scan but --input holds {len(jobs)}; enhance them "
            "one at a time, each with its own --mr"
        )
    return io.read_volume(mr_path)


def run(
    workdir,
    input_path,
    output_dir,
    *,
    mode,
    output_format,
    batch_size,
    which,
    mr_path=None,
    allow_units=False,
) -> int:
    """Enhance every patient of `input_path`; print what was written (and scores)."""
    jobs = inference.plan_outputs(input_path, output_dir, output_format)
    sr = inference.load(workdir, which=which, batch_size=batch_size or None)
    t1 = _read_t1(mr_path, jobs)
    # Every scan is read and checked before the first output is written, so an input the model
    # does not fit leaves nothing behind. Only a single scan is kept between the two passes.
    kept = None
    for job in jobs:
        volume = io.read_volume(job.source)
        checked = sr.check_input(volume, str(job.source), mr=t1, check_units=not allow_units)
        for problem in checked:
            logging.warning("%s", problem)
        kept = volume if len(jobs) == 1 else None
    description = sr.describe(mode)
    print(f"{sr!r}: {mode} {len(jobs)} scan(s) → {output_dir} ({description!r})")
    all_scores = []
    for job in tqdm(jobs, unit="patient", desc=mode, disable=len(jobs) == 1):
        volume = kept if kept is not None else io.read_volume(job.source)
        with tqdm(total=volume.shape[0], unit="slice", desc=job.name, leave=False) as bar:
            result, scores = _enhance_one(sr, volume, mode, bar.update, t1)
        for path in _write(job, result, description):
            tqdm.write(f"{job.name}: wrote {path}")
        _report_activity(job.name, volume, result, output_dir)
        if scores is not None:
            all_scores.append((job.name, scores))
    if all_scores:
        print(
            f"\nReconstruction (degraded ×{sr.scale}, then recovered) vs the original: "
            "normalised range, whole slice, mean over non-empty slices"
        )
        header = ["patient", "slices", "bicubic PSNR", "SR PSNR", "bicubic SSIM", "SR SSIM"]
        print(f"{header[0]:<24} {header[1]:>6} " + " ".join(f"{h:>12}" for h in header[2:]))
        for name, scores in all_scores:
            print(_format_scores(name, scores))
        if len(all_scores) > 1:
            print(_format_scores("all (slice-weighted)", _pooled(all_scores)))
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs each step of a restore at INFO, burying the progress bars and the scores.
        logging.set_verbosity(logging.WARNING)
    try:
        return run(
            _WORKDIR.value,
            _INPUT.value,
            _OUTPUT.value,
            mode=_MODE.value,
            output_format=_FORMAT.value,
            batch_size=_BATCH_SIZE.value,
            which=_CHECKPOINT.value,
            mr_path=_MR.value,
            allow_units=_ALLOW_UNITS.value,
        )
    except (
        inference.InferenceError,
        io.ScanError,
        data.DataError,
        checkpoint.CheckpointError,
    ) as error:
        print(f"enhance.py: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "input", "output"])
    app.run(main)
