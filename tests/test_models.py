"""Model shapes, parameter counts and the two long-skip variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petsr_jax.config import build_config
from petsr_jax.models import SRCNN, DeepSR, count_params, create_model


def _init(model, shape=(2, 24, 20, 1)):
    x = jax.random.uniform(jax.random.key(1), shape)
    return x, model.init(jax.random.key(0), x)["params"]


def test_parameter_counts_match_the_paper_architectures():
    assert count_params(_init(SRCNN())[1]) == 8129
    assert count_params(_init(DeepSR())[1]) == 1478337


@pytest.mark.parametrize("model", [SRCNN(), DeepSR(num_blocks=2, width=8)])
def test_output_keeps_the_input_size(model):
    x, params = _init(model, (3, 17, 23, 1))
    assert model.apply({"params": params}, x).shape == (3, 17, 23, 1)


def test_image_skip_adds_the_input_to_the_network_output():
    model = DeepSR(num_blocks=1, width=4, global_skip="image")
    x, params = _init(model)
    params = jax.tree.map(jnp.zeros_like, params)  # network contributes nothing
    np.testing.assert_array_equal(model.apply({"params": params}, x), x)


def test_feature_skip_feeds_conv_in_features_to_conv_out():
    # With zero blocks' second convs, blocks(h) = h; the feature skip makes conv_out see 2h.
    model = DeepSR(num_blocks=2, width=4, global_skip="feature")
    x, params = _init(model)
    for i in range(2):
        params[f"block_{i}"]["conv2"] = jax.tree.map(jnp.zeros_like, params[f"block_{i}"]["conv2"])
    h = (
        jax.lax.conv_general_dilated(
            x,
            params["conv_in"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + params["conv_in"]["bias"]
    )
    expected = (
        jax.lax.conv_general_dilated(
            2 * h,
            params["conv_out"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + params["conv_out"]["bias"]
    )
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
    # ... and it is a different function from the image skip with the same params.
    image = DeepSR(num_blocks=2, width=4, global_skip="image").apply({"params": params}, x)
    assert not np.allclose(image, expected, atol=1e-3)


def test_bfloat16_compute_keeps_float32_params_and_output():
    model = DeepSR(num_blocks=1, width=8, dtype=jnp.bfloat16)
    x, params = _init(model)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    y = model.apply({"params": params}, x)
    assert y.dtype == jnp.float32
    y32 = DeepSR(num_blocks=1, width=8).apply({"params": params}, x)
    np.testing.assert_allclose(y, y32, atol=5e-2)


def test_extra_input_channels_feed_the_network_but_the_skip_uses_the_pet_channel():
    model = DeepSR(num_blocks=1, width=4)
    x, params = _init(model, (2, 16, 16, 2))
    assert params["conv_in"]["kernel"].shape == (3, 3, 2, 4)
    zero = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_array_equal(model.apply({"params": zero}, x), x[..., :1])


def test_create_model_follows_the_config():
    config = build_config("deepsr", "model.num_blocks=3,model.width=16,compute_dtype=bfloat16")
    model = create_model(config)
    assert (model.num_blocks, model.width, model.dtype) == (3, 16, jnp.bfloat16)
    assert isinstance(create_model(build_config("srcnn")), SRCNN)
