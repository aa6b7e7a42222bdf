"""Measure a NEMA NU 2 image-quality phantom scan: sphere FWHM and recovery, background noise.

python launch/nema.py --input=nema_scan/ --out=reports/nema
python launch/nema.py --input=nema_scan/ --out=reports/nema_deepsr --workdir=runs/deepsr_x8
python launch/nema.py --input=nema_scan/ --out=reports/nema_rl --compare=nema_rl10.nii.gz

--input is a DICOM series folder or a NIfTI file of the phantom. The spheres are found without
coordinates: any orientation, voxel size and slice count. Writes into --out (a new or empty
folder) `nema.json` (per sphere, largest first: fitted FWHM, RC_max, RC_mean, RC_A50, EARL1 and
EARL2 flags; background mean and CoV; the true activity used), `nema.md` (the tables) and
`nema.png` (RCs against diameter with the EARL bands, fitted radial profiles), and prints the
tables. The RCs are against --true_activity (the sphere activity concentration in the scan's
units) or else the fitted plateau of the 37 mm sphere.

--workdir also enhances the scan with that trained run and analyses the result; --compare
analyses an already enhanced or deconvolved scan of the same phantom (launch/enhance.py,
launch/deconvolve.py). Either adds the second analysis and a before/after table (FWHM ratio,
RC_A50 before and after, background CoV ratio, background mean and total activity change) to
the outputs, the after RCs taken against the input's true activity.

A scan that is not a NEMA IQ phantom, spheres that cannot be found or that the field of view
cuts end with one line naming what was not found, exit status 2, and nothing written.
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags (no-op on GPUs)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import flags  # noqa: E402

from petsr_jax import cli  # noqa: E402
from petsr_jax.evaluation import nema  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "DICOM series folder or NIfTI file of the phantom.")
_OUT = flags.DEFINE_string("out", None, "New (or empty) folder for nema.json, nema.md, nema.png.")
_TRUE_ACTIVITY = flags.DEFINE_float(
    "true_activity",
    None,
    "True sphere activity concentration, in the scan's units (default: the fitted plateau of "
    "the 37 mm sphere).",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Also enhance the scan with this trained run and compare."
)
_PSF_FWHM_MM = flags.DEFINE_float(
    "psf_fwhm_mm",
    None,
    "With --workdir: the scan's PSF FWHM in mm, told to a model trained with the scanner "
    "variant (else its config's scanner.nominal_fwhm_mm, with a warning).",
)
_COMPARE = flags.DEFINE_string(
    "compare",
    None,
    "Also analyse this scan of the same phantom (DICOM folder or NIfTI; an enhanced or "
    "deconvolved version of --input) and compare.",
)


def main(argv):
    if len(argv) > 1:
        print(f"nema.py: error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    with cli.reporting("nema.py", nema.NemaError):
        tables = nema.measure_scan(
            _INPUT.value,
            _OUT.value,
            true_activity=_TRUE_ACTIVITY.value,
            workdir=_WORKDIR.value,
            compare_path=_COMPARE.value,
            psf_fwhm_mm=_PSF_FWHM_MM.value,
        )
    print(tables, end="")
    print(f"wrote {', '.join(str(Path(_OUT.value) / name) for name in nema.FILES)}")
    return 0


if __name__ == "__main__":
    cli.run(
        main,
        usage="--input=<DICOM folder | NIfTI> --out=<folder> [--true_activity=<value>] "
        "[--workdir=<run> | --compare=<scan>]",
        example="python launch/nema.py --input=nema_scan/ --out=reports/nema",
        required=["input", "out"],
    )
