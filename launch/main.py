"""Train and evaluate one model: flags → validate → `train_and_evaluate(config, workdir)`.

python launch/main.py --config=configs/deepsr.py:scale=8
python launch/main.py --config=configs/srcnn.py:scale=8,quick --workdir=runs/srcnn_quick
"""

from petsr_jax import perf

perf.configure_cpu()  # before JAX starts: XLA CPU flags that speed up training (no-op on GPUs)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from petsr_jax import distributed, report, train  # noqa: E402
from petsr_jax.config import validate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and its arg.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (default: runs/<model>_x<scale>[_<flags>])."
)


def main(argv):
    del argv
    config = _CONFIG.value
    distributed.initialize(config)
    validate(config)
    workdir = _WORKDIR.value or train.default_workdir(config)
    logging.info("workdir: %s", workdir)
    results = train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        print(report.results_markdown(results))
        print(f"Outputs in {workdir}: results.json, results.md, test_slices.png, tensorboard/")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
