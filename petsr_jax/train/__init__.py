"""Training: a pure jitted train step, and `train_and_evaluate(config, workdir)` around it.

    step.py      TrainState, make_optimizer, init_state, mse_loss, make_train_step,
                 jit_train_step, params_finite: the step, pure and jitted for the mesh
    loop.py      train_and_evaluate: prepare the data, build (or restore) the state, train,
                 evaluate the test split; the method section, top to bottom
    logging.py   what the loop reports while it runs: metrics.jsonl and TensorBoard (cut back
                 on resume), images per second over training steps only, its time, the bar

Everything a caller uses is here:

    from petsr_jax import train
    results = train.train_and_evaluate(config, "runs/deepsr_x8")
"""

from petsr_jax.train.loop import TrainingDiverged, train_and_evaluate
from petsr_jax.train.step import (
    TrainState,
    init_state,
    jit_train_step,
    make_optimizer,
    make_train_step,
    mse_loss,
    params_finite,
)

__all__ = [
    "TrainState",
    "TrainingDiverged",
    "init_state",
    "jit_train_step",
    "make_optimizer",
    "make_train_step",
    "mse_loss",
    "params_finite",
    "train_and_evaluate",
]
