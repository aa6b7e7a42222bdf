"""Tests for petsr_jax.evaluation.predict: the one batched loop every model call goes through."""

import jax
import jax.numpy as jnp
import numpy as np

from petsr_jax import sharding
from petsr_jax.evaluation.predict import batch_size_for, jit_on_mesh, map_batches


def _traced(counter: list):
    """A jitted `fn(params, x) -> (x * params, row sums)` that counts its traces."""

    def fn(params, x):
        counter.append(x.shape)  # runs once per trace, i.e. once per input shape
        return x * params, jnp.sum(x, axis=(1, 2))

    return jax.jit(fn)


def test_batches_equal_one_big_call_and_compile_once():
    x = np.random.default_rng(0).normal(size=(7, 5, 4)).astype(np.float32)
    traces, done = [], []
    scaled, sums = map_batches(_traced(traces), 2.0, x, batch_size=3, progress=done.append)
    np.testing.assert_allclose(scaled, 2.0 * x, rtol=1e-6)
    np.testing.assert_allclose(sums, x.sum(axis=(1, 2)), rtol=1e-5)
    assert traces == [(3, 5, 4)]  # the last batch of 1 is zero-filled to 3, not recompiled
    assert done == [3, 3, 1]


def test_dict_inputs_on_a_mesh_are_padded_to_the_devices_and_trimmed():
    mesh = sharding.make_mesh()
    assert mesh.size == 4
    inputs = {
        "a": np.arange(10, dtype=np.float32).reshape(10, 1),
        "b": np.ones((10, 1), np.float32),
    }
    fn = jit_on_mesh(lambda p, batch: batch["a"] + p * batch["b"], mesh)
    out = map_batches(fn, jnp.float32(0.5), inputs, batch_size=6, mesh=mesh)
    np.testing.assert_allclose(out[:, 0], np.arange(10) + 0.5)
    assert batch_size_for(10, 6, mesh) == 8  # rounded up to whole devices
    assert batch_size_for(3, 6, mesh) == 4  # at least one item per device


def test_no_items_give_none():
    assert map_batches(lambda p, x: x, None, np.zeros((0, 4), np.float32), batch_size=2) is None
