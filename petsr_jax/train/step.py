"""The train step: a pure `train_step(state, batch) -> (state, metrics)`, jitted for a mesh.

The step receives high-resolution slices only; the task (`petsr_jax.task.Task`) makes the
network input inside it — the paper's bicubic ↓↑ or a scanner's PSF and noise, drawn from the
state's PRNG key — so the loader moves no low-resolution copy and training, evaluation and load
cannot disagree on the degradation. It is jitted with explicit shardings over a 1-D `data` mesh
(params replicated, batch split, state donated), so one code path serves one CPU, several GPUs
and several hosts.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from petsr_jax import sharding
from petsr_jax.task import Task


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so it is saved and restored like any array


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam at the paper's constant learning rate (1e-3 SRCNN, 1e-4 DeepSR)."""
    return optax.adam(config.train.lr)


def init_state(config, model, tx) -> TrainState:
    rng = jax.random.PRNGKey(config.seed)
    init_rng, rng = jax.random.split(rng)
    # Parameter shapes do not depend on the image size: a small dummy and one jitted init
    # compile much faster than tracing every layer eagerly at full size.
    dummy = jnp.zeros((1, 16, 16, config.model.in_channels), jnp.float32)
    params = jax.jit(model.init)(init_rng, dummy)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
    )


def mse_loss(params, model, task: Task, batch, keys):
    """MSE between the network's output for the degraded batch and the task's target.

    `batch["hr"]` is already in the run's domain (`data.to_domain`); `task` degrades it (and
    its neighbours, `batch["context"]`) with one PRNG key per image, and MR guidance
    (`batch["guide"]`) joins the input undegraded.
    """
    return task.loss(model, params, batch, keys)


def make_train_step(model, tx, task: Task):
    """The pure train step for a model, optimizer and task (jit it with `jit_train_step`).

    The state's PRNG key draws the step's stochastic degradation (a scanner's PSF and noise,
    one draw per image) and is split every step, so a resumed run draws what an uninterrupted
    one would.
    """

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        keys = jax.random.split(step_rng, batch["hr"].shape[0])
        loss, grads = jax.value_and_grad(mse_loss)(state.params, model, task, batch, keys)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def jit_train_step(train_step, mesh):
    """`train_step` jitted for the mesh: state replicated and donated, batch split on `data`."""
    rep = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(rep, sharding.batch_sharded(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )


def params_finite(tree) -> bool:
    """True when every leaf of a pytree is finite (checked before a checkpoint is written)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))
