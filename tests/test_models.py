"""Model shapes, parameter counts, the two long-skip variants, the initialisations and which
convolution module a config builds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petsr_jax.config import build_config
from petsr_jax.cpu import fast_conv, resolve_conv
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
    model = DeepSR(num_blocks=1, width=4, global_skip="image")
    x, params = _init(model, (2, 16, 16, 2))
    assert params["conv_in"]["kernel"].shape == (3, 3, 2, 4)
    zero = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_array_equal(model.apply({"params": zero}, x), x[..., :1])


def test_create_model_follows_the_config():
    config = build_config("deepsr", "model.num_blocks=3,model.width=16,compute_dtype=bfloat16")
    model = create_model(config)
    assert (model.num_blocks, model.width, model.dtype) == (3, 16, jnp.bfloat16)
    assert isinstance(create_model(build_config("srcnn")), SRCNN)


# --------------------------------------------------------------------------------------------
# Initialisation: PyTorch's default (the authors' code) keeps the deep residual stream stable
# --------------------------------------------------------------------------------------------


def _relative_init_change(initialization, skip, seed):
    """rms(output − input) / rms(input) of the full DeepSR 20×64 at initialisation."""
    x = jax.random.uniform(jax.random.key(100 + seed), (2, 32, 32, 1))
    model = DeepSR(global_skip=skip, initialization=initialization)
    params = model.init(jax.random.key(seed), x)["params"]
    y = model.apply({"params": params}, x)
    return float(jnp.sqrt(jnp.mean(jnp.square(y - x))) / jnp.sqrt(jnp.mean(jnp.square(x))))


@pytest.mark.parametrize("skip", ["feature", "image"])
def test_full_deepsr_starts_near_its_input_with_torch_init_and_explodes_with_flax_init(skip):
    for seed in range(3):
        assert _relative_init_change("torch", skip, seed) < 2.0
        assert _relative_init_change("flax", skip, seed) > 10.0


def test_torch_init_draws_as_pytorch_conv2d_does():
    # PyTorch: kernel kaiming_uniform(a=√5) = U(±1/√fan_in), bias U(±1/√fan_in).
    torch = pytest.importorskip("torch")
    params = SRCNN().init(jax.random.key(0), jnp.ones((1, 16, 16, 1)))["params"]
    params.update(DeepSR(num_blocks=1).init(jax.random.key(0), jnp.ones((1, 16, 16, 1)))["params"])
    for name in ("patch_extraction", "nonlinear_mapping", "reconstruction", "block_0"):
        layer = params[name]["conv1"] if name == "block_0" else params[name]
        kh, kw, c_in, c_out = layer["kernel"].shape
        reference = torch.nn.Conv2d(c_in, c_out, (kh, kw))
        bound = 1 / np.sqrt(kh * kw * c_in)
        for ours, theirs in ((layer["kernel"], reference.weight), (layer["bias"], reference.bias)):
            ours, theirs = np.asarray(ours), theirs.detach().numpy()
            assert np.abs(ours).max() <= bound
            assert np.abs(theirs).max() <= bound
            if ours.size >= 1000:  # same distribution: standard deviations within sampling error
                assert abs(ours.std() - theirs.std()) < 0.05 * theirs.std()


def test_srcnn_init_is_the_original_gaussian():
    params = SRCNN(initialization="srcnn").init(jax.random.key(0), jnp.ones((1, 16, 16, 1)))
    kernel = np.asarray(params["params"]["patch_extraction"]["kernel"])
    assert abs(kernel.std() - 0.001) < 1e-4
    assert not np.any(params["params"]["patch_extraction"]["bias"])


def test_residual_scale_scales_each_block_branch():
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
    scaled = DeepSR(num_blocks=2, width=8, residual_scale=0.1)
    params = scaled.init(jax.random.key(0), x)["params"]
    # The same function: scale 1 with each block's second convolution multiplied by 0.1.
    folded = {k: dict(v) for k, v in params.items()}
    for i in range(2):
        folded[f"block_{i}"]["conv2"] = jax.tree.map(
            lambda p: 0.1 * p, params[f"block_{i}"]["conv2"]
        )
    np.testing.assert_allclose(
        scaled.apply({"params": params}, x),
        DeepSR(num_blocks=2, width=8).apply({"params": folded}, x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_create_model_takes_init_and_residual_scale_from_the_config():
    model = create_model(build_config("deepsr", "init=flax,residual_scale=0.1"))
    assert (model.initialization, model.residual_scale) == ("flax", 0.1)
    assert create_model(build_config("deepsr")).global_skip == "feature"


# --------------------------------------------------------------------------------------------
# The convolution module: flax's wherever several devices or an accelerator compute
# --------------------------------------------------------------------------------------------


def test_conv_choice_follows_the_backend_and_the_device_count():
    assert resolve_conv("auto", backend="gpu", devices=1) == "flax"
    # Several CPU devices (this test session): flax's, the path every GPU runs.
    assert resolve_conv("auto", backend="cpu", devices=4) == "flax"
    assert resolve_conv("auto") == "flax"
    assert resolve_conv("cpu", backend="cpu", devices=4) == "cpu"
    with pytest.raises(ValueError, match="model.conv"):
        resolve_conv("fast")


def test_create_model_builds_the_module_the_config_names():
    for conv, module in (("auto", nn.Conv), ("flax", nn.Conv)):
        assert create_model(build_config("srcnn", f"model.conv={conv}")).conv is module
    assert create_model(build_config("deepsr", "model.conv=cpu")).conv is fast_conv.Conv
