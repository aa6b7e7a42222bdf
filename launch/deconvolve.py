"""Richardson–Lucy deconvolution of a scan by a Gaussian PSF: the classical enhancement baseline.

python launch/deconvolve.py --input=scan_dicom/ --output=rl10/ --psf_fwhm_mm=4.3 --iterations=10
python launch/deconvolve.py --input=scan.nii.gz --output=rl30.nii.gz --psf_fwhm_mm=4.3 \
    --psf_fwhm_axial_mm=5.0 --iterations=30

--input is a DICOM series folder or a NIfTI file. --output names the result: a path ending in
.nii or .nii.gz is written as a NIfTI file, any other as a new DICOM series folder; both in the
input's units and geometry, complete or not at all, never over the input or an existing output.
The PSF is an isotropic Gaussian of --psf_fwhm_mm (or that in plane and --psf_fwhm_axial_mm
along the slices), converted to voxels from the scan's spacing; the iterations are the only
regularisation (more: sharper and noisier). Total activity is kept; the change is printed.
Measure the result with `launch/nema.py --input=<scan> --compare=<output>`.
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags (no-op on GPUs)

import sys  # noqa: E402

from absl import flags  # noqa: E402

from petsr_jax import cli, deconvolution  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "DICOM series folder or NIfTI file.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Result: a .nii / .nii.gz file, or else a new DICOM series folder."
)
_PSF_FWHM_MM = flags.DEFINE_float("psf_fwhm_mm", None, "PSF FWHM in mm (in plane, and axial).")
_PSF_FWHM_AXIAL_MM = flags.DEFINE_float(
    "psf_fwhm_axial_mm", None, "Axial PSF FWHM in mm (default: --psf_fwhm_mm)."
)
_ITERATIONS = flags.DEFINE_integer("iterations", 10, "Richardson-Lucy iterations.")


def main(argv):
    if len(argv) > 1:
        print(f"deconvolve.py: error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    with cli.reporting("deconvolve.py", deconvolution.DeconvolutionError):
        print(
            deconvolution.deconvolve_scan(
                _INPUT.value,
                _OUTPUT.value,
                psf_fwhm_mm=_PSF_FWHM_MM.value,
                iterations=_ITERATIONS.value,
                psf_fwhm_axial_mm=_PSF_FWHM_AXIAL_MM.value,
            )
        )
    return 0


if __name__ == "__main__":
    cli.run(
        main,
        usage="--input=<DICOM folder | NIfTI> --output=<folder | .nii.gz> --psf_fwhm_mm=<mm> "
        "[--psf_fwhm_axial_mm=<mm>] [--iterations=10]",
        example=(
            "python launch/deconvolve.py --input=scan_dicom/ --output=rl10/ --psf_fwhm_mm=4.3 "
            "--iterations=10"
        ),
        required=["input", "output", "psf_fwhm_mm"],
    )
