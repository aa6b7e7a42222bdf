"""Train and evaluate one model: flags → `train_and_evaluate(config, workdir)`.

Examples, one per use:

  python launch/main.py --config=configs/deepsr.py:scale=8,quick     # a 2-core CPU: minutes
  python launch/main.py --config=configs/deepsr.py:scale=8,gpu       # the full DeepSR, one GPU
  python launch/main.py --config=configs/srcnn.py:scale=16,gpu       # the other network, 16x
  python launch/main.py --config=configs/deepsr.py:scale=8,quick,mr  # PET and T1 in, MR-guided
  python launch/main.py --config=configs/deepsr.py:scale=8,quick,lr=3e-4  # override a field
  python launch/main.py --config=configs/deepsr.py:scale=8 --config.data.root=/data/my_pet
  python launch/main.py --config=configs/srcnn.py:scale=8,quick --workdir=runs/srcnn_quick

The workdir (default runs/<model>_x<scale>[_<cohort>][_b<blocks>][_<domain>][_mr]) receives the
checkpoints, results and figures; rerunning the same command resumes an interrupted run. Several
processes (hosts, or one process per GPU) run the same command: JAX's runtime starts from a SLURM
`srun` or Open MPI job step by itself, or from --config.distributed.coordinator_address=host0:1234,
--config.distributed.num_processes=<N> and --config.distributed.process_id=<0..N-1> on every host.

A bad config, data root, workdir or checkpoint ends with one line naming the problem and exit
status 2; a run whose loss diverges exits with status 3 and keeps its last good checkpoint.
"""

import sys

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags for training (no-op on GPUs)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from petsr_jax import cli, distributed, train  # noqa: E402
from petsr_jax.evaluation import report  # noqa: E402
from petsr_jax.run import identity, layout  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "configs/<model>.py:<variants>[,<field>=<value>...], e.g. configs/deepsr.py:scale=8,quick; "
    "the variants are listed above.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run folder (default: runs/<model>_x<scale>[_<cohort>][_b<blocks>][_<domain>][_mr], plus "
    "-<hash> when that folder holds a run of another config).",
)


def run(config, workdir: str | None) -> dict:
    """Start the distributed runtime if asked, train, print the results.

    The config is checked once, by `train_and_evaluate`, before it touches data or the workdir.
    """
    distributed.initialize(config)  # first: it must precede anything that starts JAX
    workdir = workdir or str(identity.default_workdir(config))
    logging.info("workdir: %s", workdir)
    results = train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        print(report.results_markdown(results))
        print(
            f"Outputs in {workdir}: {layout.RESULTS_MD}, {layout.RESULTS}, "
            f"{layout.TEST_FIGURE}, {layout.CURVES}, {layout.RUN_RECORD}, "
            f"{layout.TENSORBOARD}/; in a notebook: "
            f"petsr_jax.load({str(workdir)!r})"
        )
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        with cli.reporting("main.py", OSError):
            run(_CONFIG.value, _WORKDIR.value)
    except train.TrainingDiverged as error:
        print(f"main.py: training diverged: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    cli.run(
        main,
        usage="--config=configs/<model>.py:<variants>[,<field>=<value>] [--workdir=<dir>]",
        example="python launch/main.py --config=configs/deepsr.py:scale=8,quick",
        required=["config"],
    )
