"""Train and evaluate one model: flags → validate → `train_and_evaluate(config, workdir)`.

python launch/main.py --config=configs/deepsr.py:scale=8
python launch/main.py --config=configs/srcnn.py:scale=8,quick --workdir=runs/srcnn_quick

Several processes (hosts, or one process per GPU) run the same command; JAX's runtime starts
from a SLURM `srun` or Open MPI job step by itself, or from explicit flags on every process:

python launch/main.py --config=configs/deepsr.py:scale=8 --workdir=/shared/runs/deepsr \
    --config.distributed.coordinator_address=host0:12345 \
    --config.distributed.num_processes=2 --config.distributed.process_id=0   # 1 on host1

A bad config, data root, workdir or checkpoint ends with one line naming the problem and exit
status 2; a run whose loss diverges exits with status 3 and keeps its last good checkpoint.
"""

import sys

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags for training (no-op on GPUs)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from petsr_jax import checkpoint, data, distributed, io, train  # noqa: E402
from petsr_jax import workdir as workdir_lib  # noqa: E402
from petsr_jax.config import ConfigError, parse_flags, validate  # noqa: E402
from petsr_jax.evaluation import report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and its arg.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run folder (default: runs/<model>_x<scale>[_<cohort>][_b<blocks>][_<domain>][_mr], plus "
    "-<hash> when that folder holds a run of another config).",
)

# Errors about the user's inputs: their messages say what to change, a traceback adds nothing.
USER_ERRORS = (
    ConfigError,
    distributed.DistributedError,
    data.DataError,
    io.ScanError,
    checkpoint.CheckpointError,
    workdir_lib.WorkdirError,
    OSError,
)


def run(config, workdir: str | None) -> dict:
    """Start the distributed runtime if asked, check the config, train, print the results."""
    distributed.initialize(config)  # first: it must precede anything that starts JAX
    validate(config)
    workdir = workdir or str(workdir_lib.default_workdir(config))
    logging.info("workdir: %s", workdir)
    results = train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        print(report.results_markdown(results))
        print(
            f"Outputs in {workdir}: results.md, results.json, test_slices.png, "
            "training_curves.png, run.json, tensorboard/; in a notebook: "
            f"petsr_jax.load({str(workdir)!r})"
        )
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO, burying the bar
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except train.TrainingDiverged as error:
        print(f"main.py: training diverged: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
