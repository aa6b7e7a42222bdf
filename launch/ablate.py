"""Ablation over one config field: one run per value, then a table and plots across the runs.

Examples, one per use:

  python launch/ablate.py --config=configs/deepsr.py:scale=8,quick --sweep=depth --values=2,4,8
  python launch/ablate.py --config=configs/deepsr.py:scale=8 --sweep=depth --values=5,10,20,30
  python launch/ablate.py --config=configs/deepsr.py:scale=8 --sweep=lr --values=1e-3,3e-4,1e-4
  python launch/ablate.py --config=configs/deepsr.py:scale=8 --sweep=model.width --values=32,64

One workdir per value under --runs (`runs/ablation/deepsr_x8_depth10`, ...). Rerunning the same
command skips finished runs and resumes interrupted ones. The logic lives in
`petsr_jax.experiments.ablation` (usable from a notebook).
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags for training (no-op on GPUs)

import jax  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from petsr_jax import cli, distributed  # noqa: E402
from petsr_jax.experiments import ablation  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "configs/<model>.py:<variants>[,<field>=<value>...], the base of every run, e.g. "
    "configs/deepsr.py:scale=8,quick; the variants are listed above.",
    lock_config=True,
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
    with cli.reporting("ablate.py", ablation.AblationError):
        table = ablation.run_sweep(config, _SWEEP.value, _VALUES.value, _RUNS.value, _OUT.value)
    if jax.process_index() == 0:
        print(ablation.table_markdown(table))


if __name__ == "__main__":
    cli.run(
        main,
        usage="--config=configs/<model>.py:<variants> --sweep=<field> --values=<v1>,<v2>,...",
        example=(
            "python launch/ablate.py --config=configs/deepsr.py:scale=8,quick --sweep=depth "
            "--values=2,4,8"
        ),
        required=["config", "sweep", "values"],
    )
