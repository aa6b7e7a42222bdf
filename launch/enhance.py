"""Apply a trained model to scans and write the results as new DICOM series and/or NIfTI files.

Examples, one per use (the workdir is the README's quick run; a folder of patients or one scan):

  python launch/enhance.py --workdir=runs/deepsr_x8_small_b6 --input=scan_dicom/ --output=sr/
  python launch/enhance.py --workdir=runs/deepsr_x8_small_b6 --input=scan.nii.gz --output=sr/
  python launch/enhance.py --workdir=runs/deepsr_x8_small_b6 --input=scan/ --output=sr/ --resample
  python launch/enhance.py --workdir=runs/deepsr_x8_small_b6 --input=patients/ --output=sr/
  python launch/enhance.py --workdir=runs/deepsr_x8_small_b6 --input=scan/ --output=rec/ \
--mode=reconstruct
  python launch/enhance.py --workdir=runs/deepsr_x8_small_b6_mr --input=pet/ --mr=t1.nii.gz \
--output=sr/

--input is a DICOM series folder, a NIfTI file, or a folder of patients (one DICOM folder or
NIfTI file each, as a data root). Each patient gets `<output>/<name>/` (DICOM) and/or
`<output>/<name>.nii.gz`, in the input's physical units and geometry. --mode=enhance applies the
network to the scan as it is; --mode=reconstruct degrades it by the model's scale first and
prints PSNR / SSIM of bicubic and SR against the original, with a warning where the model scores
below bicubic. --resample enhances each scan at the training data's pixel spacing
(`data_info.json`) and resamples the result back, so the output stays on the input's grid.

Everything that would be refused (an output inside the input, an existing output, an input of
another quantity than the training data) is refused before the first file is written. A scan in
other units than the training data is enhanced when the two differ by a constant factor (SUVbw vs
Bq/mL: normalisation removes it), with a warning; another modality or quantity (a parametric
map...) is refused unless --allow_units. Outputs hold no negative activity (clipped at 0); each
scan's change of total and maximum activity against its input is printed and recorded in
`<output>/activity_changes.json`, with a warning when it is large enough to shift quantitation.
A model trained with MR guidance (the `mr` config variant) needs --mr, the scan's co-registered
T1 (a DICOM series folder or NIfTI file on the PET's grid); any other model refuses --mr.
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags (no-op on GPUs)

import sys  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from petsr_jax import cli, data, inference, io, metrics, quantitation  # noqa: E402

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "A training run's folder (config.json + checkpoints), e.g. runs/deepsr_x8_small_b6, which "
    "the README's quick command trains.",
)
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
_RESAMPLE = flags.DEFINE_bool(
    "resample",
    False,
    "Resample each scan to the training data's pixel spacing (the workdir's data_info.json) "
    "before enhancing it, and the result back onto the scan's grid: the output is on the "
    "input's grid. Without it, a scan whose pixels differ from the training data's by more than "
    "10 percent is enhanced as it is, with a warning.",
)
_PSF_FWHM_MM = flags.DEFINE_float(
    "psf_fwhm_mm",
    None,
    "The scans' resolution: the PSF FWHM in mm of the scanner and reconstruction (e.g. from a "
    "NEMA measurement, launch/nema.py). A model trained with the scanner variant is told it; "
    "without it, the config's scanner.nominal_fwhm_mm is assumed, with a warning. Other models "
    "ignore it.",
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
    """One table row: PSNR in dB with 2 decimals and SSIM with 3, as in results.md."""
    cells = [f"{name:<24} {scores['slices']:>6}"]
    for key in ("bicubic/psnr", "sr/psnr", "bicubic/ssim", "sr/ssim"):
        value = scores.get(key)
        digits = 2 if key.endswith("psnr") else 3
        cells.append(f"{value:>12.{digits}f}" if value is not None else f"{'n/a':>12}")
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


def _enhance_one(
    sr, volume, mode: str, progress, t1=None, psf_fwhm_mm=None
) -> tuple[io.Volume, dict | None]:
    """The output volume of one patient (activity clipped at 0, the clipped voxels counted in
    its meta) and, in reconstruct mode, its scores. The scan was checked before any output was
    written (`run`), so the resolver does not check it again."""
    if mode == "enhance":
        enhanced = sr(volume, mr=t1, check_units=None, progress=progress, psf_fwhm_mm=psf_fwhm_mm)
        return enhanced, None
    degraded, restored = sr.reconstruct(volume, mr=t1, check_units=None, progress=progress)
    # Scored in the network's range, as training saw it: the volume divided by its maximum.
    normalised, factor = data.normalise(volume.data)
    scores = reconstruction_scores(normalised, degraded.data / factor, restored.data / factor)
    return restored, scores


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
    `<output>/activity_changes.json` (updated after each scan, so it matches what is on disk);
    a change large enough to shift quantitation is a warning of its own."""
    change = quantitation.activity_change(
        source.data,
        result.data,
        units=source.units,
        clipped_voxels=result.meta.get("clipped_voxels", 0),
    )
    path = quantitation.record_changes(output_dir, {name: change})
    tqdm.write(f"{name}: activity vs input: {change.summary()} (recorded in {path})")
    for problem in inference.activity_warnings(change):
        cli.warning(f"{name}: {problem}")


def _unrecorded(error, name: str, written: list[str], jobs, output_dir) -> str:
    """The one-line error for a scan whose activity record cannot be written: its outputs are
    withdrawn, so every output in the folder has its record, or named when that fails too."""
    left = io.files.withdraw(written)
    names = [job.name for job in jobs]
    after = len(names) - names.index(name) - 1
    rest = f"{name}{f' and the {after} scan(s) after it' if after else ''}"
    if left:
        done = (
            f"{', '.join(map(str, left))} could not be removed and has no activity record: "
            "delete it, "
        )
    else:
        done = f"{name}'s outputs were removed again, so every output there has its record; "
    return (
        f"{error}. {done}make {output_dir} writable, then enhance {rest} again, or every scan "
        "into a new --output"
    )


def _training_spacing(sr) -> tuple[float, float]:
    """The training data's in-plane pixel spacing, which --resample resamples scans to."""
    spacing = (sr.data_info or {}).get("pixel_spacing_mm")
    if not spacing:
        raise inference.InferenceError(
            f"{sr.workdir}/data_info.json does not record the training data's pixel spacing "
            "(pixel_spacing_mm), which --resample resamples each scan to; enhance without "
            "--resample, or resample the scans yourself first (petsr_jax.io.resample)"
        )
    return float(spacing[0]), float(spacing[1])


def _pixels(volume) -> str:
    """`4.07 × 4.07 mm pixels (89 × 89)` for a message."""
    _, rows, columns = volume.shape
    return f"{volume.spacing[1]:.3g} × {volume.spacing[2]:.3g} mm pixels ({rows} × {columns})"


def _for_model(volume, spacing, t1=None) -> tuple[io.Volume, io.Volume | None]:
    """`volume` (and its T1) at the training pixel spacing (--resample), or as they are:
    without --resample, or when the pixels are already within 1 percent of the training data's.
    """
    if spacing is None:
        return volume, t1
    if all(abs(s / t - 1) <= 0.01 for s, t in zip(volume.spacing[1:], spacing, strict=True)):
        return volume, t1
    model_input = io.resample(volume, spacing)
    return model_input, None if t1 is None else io.resample(t1, like=model_input)


def _resampling_note(name: str, volume, model_input, mode: str) -> str:
    """What --resample did to one scan, in one line."""
    if model_input is volume:
        return f"{name}: already at the training data's pixel spacing; not resampled"
    scored = "; scores at the training spacing" if mode == "reconstruct" else ""
    return (
        f"{name}: resampled {_pixels(volume)} to the training data's {_pixels(model_input)}, "
        f"{mode}d there, and resampled back onto the input's grid{scored}"
    )


def _on_input_grid(result, volume) -> io.Volume:
    """The output of a resampled scan on the input's grid, with the input's headers and meta.
    The model's output is non-negative; what the interpolation back undershoots is clipped
    here, and the count is of the voxels written."""
    back = io.resample(result, like=volume)
    activity, clipped = quantitation.clip_negative(back.data)
    return volume.replace(data=activity, meta={**volume.meta, "clipped_voxels": clipped})


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
    resample=False,
    psf_fwhm_mm=None,
) -> int:
    """Enhance every patient of `input_path`; print what was written (and scores)."""
    jobs = inference.plan_outputs(input_path, output_dir, output_format)
    sr = inference.load(workdir, which=which, batch_size=batch_size or None)
    t1 = _read_t1(mr_path, jobs)
    spacing = _training_spacing(sr) if resample else None
    # Every scan is read and checked before the first output is written, so an input the model
    # does not fit leaves nothing behind. Only a single scan is kept between the two passes.
    kept = None
    for job in jobs:
        volume = io.read_volume(job.source)
        model_input, guide = _for_model(volume, spacing, t1)
        checked = sr.check_input(
            model_input, str(job.source), mr=guide, check_units=not allow_units
        )
        for problem in checked:
            logging.warning("%s", problem)
        kept = (volume, model_input, guide) if len(jobs) == 1 else None
    description = sr.describe(mode)
    print(f"{sr!r}: {mode} {len(jobs)} scan(s) → {output_dir} ({description!r})")
    all_scores = []
    for job in tqdm(jobs, unit="patient", desc=mode, disable=len(jobs) == 1):
        if kept is not None:
            volume, model_input, guide = kept
        else:
            volume = io.read_volume(job.source)
            model_input, guide = _for_model(volume, spacing, t1)
        with tqdm(total=model_input.shape[0], unit="slice", desc=job.name, leave=False) as bar:
            resampled = model_input is not volume
            result, scores = _enhance_one(sr, model_input, mode, bar.update, guide, psf_fwhm_mm)
        if resample:
            tqdm.write(_resampling_note(job.name, volume, model_input, mode))
        if resampled:
            result = _on_input_grid(result, volume)
        written = _write(job, result, description)
        for path in written:
            tqdm.write(f"{job.name}: wrote {path}")
        try:
            _report_activity(job.name, volume, result, output_dir)
        except io.ScanError as error:
            raise io.ScanError(_unrecorded(error, job.name, written, jobs, output_dir)) from None
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
        sys.stdout.flush()  # the table first, then the warnings about it on stderr
        for name, scores in all_scores:
            for problem in inference.score_warnings(scores):
                cli.warning(f"{name}: {problem}")
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with cli.reporting("enhance.py", OSError):
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
            resample=_RESAMPLE.value,
            psf_fwhm_mm=_PSF_FWHM_MM.value,
        )


if __name__ == "__main__":
    cli.run(
        main,
        usage="--workdir=<training run> --input=<scan or patients folder> --output=<folder>",
        example=(
            "python launch/enhance.py --workdir=runs/deepsr_x8_small_b6 --input=scan_dicom/ "
            "--output=enhanced/"
        ),
        required=["workdir", "input", "output"],
    )
