"""Ablation over one config field: one run per value, then a table and plots across the runs.

python launch/ablate.py --config=configs/deepsr.py:scale=8 --sweep=depth --values=5,10,20,30
python launch/ablate.py --config=configs/deepsr.py:scale=8 --sweep=lr --values=1e-3,3e-4,1e-4,3e-5
python launch/ablate.py --config=configs/deepsr.py:scale=8,quick --sweep=depth --values=2,6,12 \
    --config.train.epochs=10 --runs=runs/ablation_quick
python launch/ablate.py --config=configs/deepsr.py:scale=8 --sweep=model.width --values=32,64

Rerunning the same command skips finished runs and resumes interrupted ones. The logic lives in
`petsr_jax.experiments.ablation` (usable from a notebook).
"""

import sys

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags for training (no-op on GPUs)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from petsr_jax import distributed  # noqa: E402
from petsr_jax.config import parse_flags  # noqa: E402
from petsr_jax.experiments import ablation  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and its arg (the base of every run).", lock_config=True
)
_SWEEP = flags.DEFINE_string(
    "sweep", None, "depth (model.num_blocks), lr (train.lr) or any dotted config field."
)
_VALUES = flags.DEFINE_list("values", None, "Comma-separated values, typed like the field.")
_RUNS = flags.DEFINE_string("runs", "runs/ablation", "Folder holding one workdir per run.")
_OUT = flags.DEFINE_string(
    "out",
    None,
    "Folder for the table and plots (default: <runs>/<model>_x<scale>[_<cohort>]_<sweep>_sweep).",
)


def main(argv):
    del argv
    config = _CONFIG.value
    distributed.initialize(config)
    try:
        table = ablation.run_sweep(config, _SWEEP.value, _VALUES.value, _RUNS.value, _OUT.value)
    except ablation.AblationError as e:
        sys.exit(f"launch/ablate.py: {e}")  # the reason alone, without the flags' help
    if jax.process_index() == 0:
        print(ablation.table_markdown(table))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "sweep", "values"])
    app.run(main, flags_parser=parse_flags)
