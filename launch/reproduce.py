"""Reproduce the paper: SRCNN and DeepSR at 8×, 12×, 16×, then Tables 1–3, Figures 2–5, report.md.

Examples, one per use:

  python launch/reproduce.py --quick              # small cohort, short runs: ~1 h on a 2-core CPU
  python launch/reproduce.py                      # the full paper protocol: a GPU
  python launch/reproduce.py --quick --scales=8   # one scale only
  python launch/reproduce.py --config_arg=tiny    # the tests' size, to try the pipeline out

Finished runs are reused and interrupted ones resumed, so rerunning the same command after a stop
continues where it left off; the logic lives in `petsr_jax.experiments.reproduce` (importable from a
notebook).
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags for training (no-op on GPUs)

import shlex  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from petsr_jax import cli, distributed  # noqa: E402
from petsr_jax.config import build_config  # noqa: E402
from petsr_jax.experiments import reproduce  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Each config's `quick` flag (2-core CPU, ~1 hour).")
_SCALES = flags.DEFINE_list("scales", ["8", "12", "16"], "Downscaling factors.")
_RUNS = flags.DEFINE_string("runs", "runs", "Folder of the run workdirs.")
_OUT = flags.DEFINE_string("out", "reports/paper", "Folder of the tables, figures and report.")
_CONFIG_ARG = flags.DEFINE_string(
    "config_arg", "", "More config for both models, e.g. 'tiny,train.epochs=2' (not scale)."
)


def main(argv):
    del argv
    try:
        scales = tuple(int(s) for s in _SCALES.value)
    except ValueError:
        raise app.UsageError(
            f"--scales: expected integers like 8,12,16, got {_SCALES.value}"
        ) from None
    settings = reproduce.Settings(
        scales=scales,
        quick=_QUICK.value,
        config_arg=_CONFIG_ARG.value,
        runs_dir=_RUNS.value,
        out_dir=_OUT.value,
    )
    try:
        first = build_config("srcnn", settings.model_arg(scales[0]))
    except (KeyError, ValueError) as e:
        raise app.UsageError(f"--config_arg: {e}") from None
    # Before anything asks JAX for its devices: a multi-process run needs the runtime first.
    distributed.initialize(first)
    with cli.reporting("reproduce.py", reproduce.ReproduceError):
        summary = reproduce.reproduce(settings, command=shlex.join(["python"] + sys.argv))
    for run in summary["runs"]:
        print(f"{run['model']} {run['scale']}x: {run['status']} ({run['workdir']})")
    print(f"Report: {settings.out_dir}/report.md")


if __name__ == "__main__":
    cli.run(
        main,
        usage="[--quick] [--scales=8,12,16] [--runs=<folder>] [--out=<folder>]",
        example="python launch/reproduce.py --quick",
    )
