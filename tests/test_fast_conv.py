"""The fast CPU convolution computes the same maths as flax's and holds the same parameters.

The convolution and its three gradients are checked against a float64 NumPy implementation
written from the definition (sliding windows), and the whole train-step gradient of both
networks against plain `jax.grad` through `flax.linen.Conv`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_train_gradients_match_xla, reference_conv_and_grads, rel_err

from petsr_jax.cpu import fast_conv
from petsr_jax.models import SRCNN, DeepSR, count_params


@pytest.mark.parametrize(
    "shape,ksize,cout",
    [
        ((2, 11, 13, 3), 3, 5),
        ((1, 9, 7, 4), 9, 6),
        ((3, 6, 5, 8), 1, 4),
        ((2, 8, 8, 6), 5, 1),
        ((8, 5, 6, 2), 3, 3),  # a batch large enough for the kernel gradient without strips
    ],
)
def test_conv2d_same_and_its_gradients_equal_a_float64_reference(shape, ksize, cout):
    rng = np.random.default_rng(sum(shape) + ksize)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((ksize, ksize, shape[-1], cout)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (cout,)).astype(np.float32)

    y, vjp = jax.vjp(fast_conv.conv2d_same, x, kernel, bias)
    dx, dkernel, dbias = vjp(jnp.asarray(g))
    ref = reference_conv_and_grads(x, kernel, bias, g)
    for name, got, want in zip(
        ("y", "dx", "dkernel", "dbias"), (y, dx, dkernel, dbias), ref, strict=True
    ):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("shape,ksize", [((1, 13, 6, 3), 3), ((2, 10, 7, 2), 5), ((3, 9, 4, 2), 1)])
def test_kernel_gradient_in_row_strips_equals_the_float64_reference(shape, ksize):
    """Small batches take the strip path; heights that do not divide evenly are padded."""
    rng = np.random.default_rng(ksize)
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (4,)).astype(np.float32)
    kernel_shape = (ksize, ksize, shape[-1], 4)
    got = fast_conv.kernel_gradient(jnp.asarray(x), jnp.asarray(g), kernel_shape)
    zeros = np.zeros(kernel_shape, np.float32)
    want = reference_conv_and_grads(x, zeros, np.zeros(4, np.float32), g)[2]
    assert rel_err(got, want) < 1e-5


def test_bias_gradient_handles_pixel_counts_not_divisible_by_the_group():
    g = np.random.default_rng(0).standard_normal((1, 7, 5, 3)).astype(np.float32)  # 35 pixels
    np.testing.assert_allclose(
        fast_conv.bias_gradient(jnp.asarray(g)), g.astype(np.float64).sum((0, 1, 2)), rtol=1e-5
    )


# -------------------------------------------------------------------- whole-network equivalence


@pytest.mark.parametrize("name,fields", [("deepsr", {"model.num_blocks": 2}), ("srcnn", {})])
def test_cpu_conv_train_gradients_equal_plain_jax_grad(name, fields):
    assert_train_gradients_match_xla(name, "cpu", **fields)


def test_cpu_conv_keeps_the_parameter_tree_and_initial_values():
    x = jnp.zeros((1, 8, 8, 1))
    for make in (SRCNN, functools.partial(DeepSR, num_blocks=2)):
        a = make(conv=nn.Conv).init(jax.random.key(0), x)["params"]
        b = make(conv=fast_conv.Conv).init(jax.random.key(0), x)["params"]
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(u, v)
    for make, n_params in ((SRCNN, 8129), (DeepSR, 1478337)):
        shapes = jax.eval_shape(make(conv=fast_conv.Conv).init, jax.random.key(0), x)["params"]
        assert count_params(shapes) == n_params


def test_padding_other_than_same_is_refused():
    with pytest.raises(ValueError, match="'SAME'"):
        fast_conv.Conv(4, (3, 3), padding="VALID").init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))


def test_cpu_conv_computes_in_the_requested_dtype():
    layer = fast_conv.Conv(4, (3, 3), dtype=jnp.bfloat16)
    x = jnp.ones((1, 8, 8, 2))
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].dtype == jnp.float32
    assert layer.apply({"params": params}, x).dtype == jnp.bfloat16
