"""PET-only against MR-guided: the side-by-side table and the lesion figure of two finished runs.

Example, after training the two quick runs:

  python launch/main.py --config=configs/deepsr.py:scale=8,quick
  python launch/main.py --config=configs/deepsr.py:scale=8,quick,mr
  python launch/compare_mr.py --pet_only=runs/deepsr_x8_small_b6 --mr=runs/deepsr_x8_small_b6_mr

`--mr` takes several MR-guided runs, comma-separated (variants of the method, e.g. with
`mr.dropout` or `task.consistency=block`). Writes `mr_comparison.md` (PSNR / SSIM whole and
brain, grey-matter activity error, lesion activity errors and contrast recovery — all lesions,
those below grey-matter uptake, the cold ones — with 95 % CIs, and each MR-guided run's paired
difference from the PET-only one lesion by lesion), `mr_comparison.json` and
`mr_comparison.png` (lesion crops: bicubic | PET-only | each MR-guided | original | T1) into
--out, and prints the table.
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags (no-op on GPUs)


from absl import app, flags  # noqa: E402

from petsr_jax import cli  # noqa: E402
from petsr_jax.experiments import mr_guidance  # noqa: E402

_PET_ONLY = flags.DEFINE_string("pet_only", None, "Workdir of the PET-only run.")
_MR = flags.DEFINE_list("mr", None, "Workdirs of MR-guided runs (config flag mr), comma-separated.")
_OUT = flags.DEFINE_string("out", "reports/mr", "Folder for the table, JSON and figure.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with cli.reporting("compare_mr.py", mr_guidance.ComparisonError):
        print(mr_guidance.compare_workdirs(_PET_ONLY.value, _MR.value, _OUT.value))
    return 0


if __name__ == "__main__":
    cli.run(
        main,
        usage="--pet_only=<workdir> --mr=<workdir of the mr variant> [--out=<folder>]",
        example=(
            "python launch/compare_mr.py --pet_only=runs/deepsr_x8_small_b6 "
            "--mr=runs/deepsr_x8_small_b6_mr"
        ),
        required=["pet_only", "mr"],
    )
