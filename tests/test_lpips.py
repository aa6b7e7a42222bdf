"""Tests for petsr_jax.metrics.perceptual: the LPIPS(VGG) network against PyTorch `lpips`, and
weight lookup.

No real weights exist here (they live on a model hub), so every test writes random ones. The
parity test builds the PyTorch `lpips` network with a random VGG16 trunk - `lpips` takes VGG16's
layer layout from torchvision, which is replaced by a stand-in module holding the standard layout,
so torchvision (and its large torch build) is not needed - exports those weights in lpips-j's file
format and compares the distances.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from petsr_jax.metrics import perceptual as lpips_lib

IMAGE_SIZE = 64


@pytest.fixture(autouse=True)
def _no_weights_from_the_environment(monkeypatch):
    # A developer's own PETSR_LPIPS_WEIGHTS must not change what these tests see.
    monkeypatch.delenv(lpips_lib.WEIGHTS_ENV_VAR, raising=False)


def _image_pairs(channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four [0, 1] image pairs: blurred, noisy, unrelated, and shifted versions of smooth images."""
    rng = np.random.default_rng(seed)
    shape = (4, IMAGE_SIZE, IMAGE_SIZE, channels)
    smooth = ndimage.gaussian_filter(rng.uniform(size=shape), sigma=(0, 3, 3, 0))
    x = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    y = np.stack(
        [
            ndimage.gaussian_filter(x[0], sigma=(3, 3, 0)),
            np.clip(x[1] + rng.normal(0, 0.1, x[1].shape), 0, 1),
            x[3],
            np.roll(x[3], 3, axis=0),
        ]
    )
    return x.astype(np.float32), y.astype(np.float32)


def _random_vgg_and_lins(seed: int):
    """He-scaled random VGG16 convolutions and non-negative linear layers, PyTorch layout."""
    rng = np.random.default_rng(seed)
    convs = [
        (
            rng.normal(0, np.sqrt(2 / (9 * c_in)), (c_out, c_in, 3, 3)),
            rng.normal(0, 0.01, c_out),
        )
        for _, c_in, c_out in lpips_lib.VGG16_CONV_LAYERS
    ]
    lins = [np.abs(rng.normal(0, 1, (1, c, 1, 1))) for c in lpips_lib.LIN_CHANNELS]
    return convs, lins


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips_weights")
    lpips_lib.write_weight_files(folder, *_random_vgg_and_lins(seed=1))
    return folder


@pytest.fixture(scope="module")
def metric(weights_dir):
    return lpips_lib.LPIPSMetric(weights_dir)


def _standard_torchvision_stub(torch):
    """A `torchvision` holding only `models.vgg16`: the standard VGG16 `features` layout."""
    layout = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]
    layout += [512, 512, 512, "M"]

    def vgg16(pretrained=False, **kwargs):
        if pretrained or kwargs.get("weights") is not None:
            raise RuntimeError("the torchvision stand-in has no pretrained weights")
        layers, c_in = [], 3
        for entry in layout:
            if entry == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [torch.nn.Conv2d(c_in, entry, 3, padding=1), torch.nn.ReLU(inplace=True)]
                c_in = entry
        return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

    models = types.ModuleType("torchvision.models")
    models.vgg16 = vgg16
    package = types.ModuleType("torchvision")
    package.models = models
    return package


@pytest.fixture(scope="module")
def torch_lpips_with_weights(tmp_path_factory):
    """PyTorch `lpips` VGG network with random trunk and linear layers, and those weights
    written as lpips-j files."""
    torch = pytest.importorskip(
        "torch", reason="PyTorch (CPU wheel) is needed for the LPIPS parity check"
    )
    stub = _standard_torchvision_stub(torch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torchvision", stub)
        patch.setitem(sys.modules, "torchvision.models", stub.models)
        try:
            lpips_torch = pytest.importorskip(
                "lpips", reason="the PyTorch lpips package (pip install --no-deps lpips) is absent"
            )
            torch.manual_seed(0)
            network = lpips_torch.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        finally:
            # lpips bound the stand-in at import; leave no such module behind for others.
            for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
                del sys.modules[name]
    convs = [m for m in network.net.modules() if isinstance(m, torch.nn.Conv2d)]
    lin_convs = [
        next(m for m in lin.modules() if isinstance(m, torch.nn.Conv2d)) for lin in network.lins
    ]
    assert len(convs) == 13 and len(lin_convs) == 5
    with torch.no_grad():
        # Trained LPIPS linear weights are non-negative, 0.1 on average: draw alike.
        for conv in lin_convs:
            conv.weight.uniform_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("lpips_torch_weights")
    lpips_lib.write_weight_files(
        folder,
        [(c.weight.detach().numpy(), c.bias.detach().numpy()) for c in convs],
        [c.weight.detach().numpy() for c in lin_convs],
    )
    return torch, network, folder


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grayscale"])
def test_matches_pytorch_lpips(torch_lpips_with_weights, channels):
    torch, network, folder = torch_lpips_with_weights
    x, y = _image_pairs(channels)

    def to_torch(images):  # NHWC [0, 1] -> NCHW [-1, 1], grey replicated like petsr_jax does
        images = np.repeat(images, 3 // channels, axis=-1)
        return torch.from_numpy(images.transpose(0, 3, 1, 2) * 2 - 1)

    with torch.no_grad():
        expected = network(to_torch(x), to_torch(y)).numpy().reshape(-1)
    actual = np.asarray(lpips_lib.LPIPSMetric(folder)(x, y))

    assert actual.shape == (len(x),)
    assert expected.min() > 1e-2, "reference distances too small for the comparison to mean much"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_equals_unmodified_lpips_j_reading_the_same_files(weights_dir, metric, monkeypatch):
    """The written files are in the format lpips-j reads, and its own loading path agrees."""
    lpips_j_module = importlib.import_module("lpips_j.lpips")
    files = {name: str(weights_dir / name) for name in lpips_lib.WEIGHT_FILES}
    monkeypatch.setattr(
        lpips_j_module, "hf_hub_download", lambda repo_id, filename: files[filename]
    )
    x, y = _image_pairs(channels=3, seed=2)
    x_in, y_in = jnp.asarray(x * 2 - 1), jnp.asarray(y * 2 - 1)
    network = lpips_j_module.LPIPS()
    params = network.init(jax.random.key(0), x_in, y_in)

    expected = np.asarray(network.apply(params, x_in, y_in)).reshape(-1)
    np.testing.assert_allclose(np.asarray(metric(x, y)), expected, rtol=1e-5, atol=1e-6)


def test_one_value_per_image_and_zero_for_identical_images(metric):
    x, y = _image_pairs(channels=1)
    y[2] = x[2]
    distances = np.asarray(metric(x, y))

    assert distances.shape == (4,) and distances.dtype == np.float32
    assert abs(distances[2]) < 1e-6
    assert np.all(np.delete(distances, 2) > 1e-3)
    # Each value depends only on its own pair.
    np.testing.assert_allclose(np.asarray(metric(x[:1], y[:1])), distances[:1], rtol=1e-5)


def test_weights_folder_from_environment_variable(weights_dir, metric, monkeypatch):
    monkeypatch.setenv(lpips_lib.WEIGHTS_ENV_VAR, str(weights_dir))
    x, y = _image_pairs(channels=1, seed=3)

    available, reason = lpips_lib.lpips_availability(allow_download=False)
    assert available and lpips_lib.WEIGHTS_ENV_VAR in reason and str(weights_dir) in reason
    np.testing.assert_allclose(np.asarray(lpips_lib.lpips(x, y)), np.asarray(metric(x, y)))


def test_weights_found_in_an_offline_hub_cache(weights_dir, metric, tmp_path):
    # The layout the Hugging Face client leaves behind after downloading a repository.
    repo_cache = tmp_path / ("models--" + lpips_lib.HUB_REPO_ID.replace("/", "--"))
    snapshot = repo_cache / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text("0123abcd")
    for name in lpips_lib.WEIGHT_FILES:
        shutil.copy(weights_dir / name, snapshot / name)

    from_cache = lpips_lib.LPIPSMetric(hub_cache_dir=tmp_path, allow_download=False)
    x, y = _image_pairs(channels=1, seed=4)
    assert str(tmp_path) in from_cache.source
    np.testing.assert_allclose(np.asarray(from_cache(x, y)), np.asarray(metric(x, y)))


def test_no_weights_anywhere_raises_with_what_was_tried_and_how_to_fix(tmp_path):
    with pytest.raises(lpips_lib.LPIPSUnavailable) as raised:
        lpips_lib.LPIPSMetric(hub_cache_dir=tmp_path, allow_download=False)
    message = str(raised.value)
    for expected in (
        str(tmp_path),
        lpips_lib.WEIGHTS_ENV_VAR,
        lpips_lib.VGG_WEIGHTS_FILE,
        lpips_lib.LIN_WEIGHTS_FILE,
        f"huggingface.co/{lpips_lib.HUB_REPO_ID}",
        "download disabled",
    ):
        assert expected in message

    available, reason = lpips_lib.lpips_availability(hub_cache_dir=tmp_path, allow_download=False)
    assert not available and reason == message


@pytest.mark.parametrize("origin", ["argument", "environment"])
def test_explicit_folder_without_the_files_is_reported(origin, weights_dir, tmp_path, monkeypatch):
    shutil.copy(weights_dir / lpips_lib.LIN_WEIGHTS_FILE, tmp_path)
    x, y = _image_pairs(channels=1)
    with pytest.raises(lpips_lib.LPIPSUnavailable) as raised:
        if origin == "argument":
            lpips_lib.lpips(x, y, weights_dir=tmp_path)
        else:
            monkeypatch.setenv(lpips_lib.WEIGHTS_ENV_VAR, str(tmp_path))
            lpips_lib.lpips(x, y)
    message = str(raised.value)
    assert str(tmp_path) in message and f"lacks {lpips_lib.VGG_WEIGHTS_FILE}" in message
    assert (lpips_lib.WEIGHTS_ENV_VAR in message.split(".")[0]) == (origin == "environment")


def test_unreadable_or_misshapen_weight_files_are_reported(weights_dir, tmp_path):
    shutil.copytree(weights_dir, tmp_path, dirs_exist_ok=True)
    vgg_file = tmp_path / lpips_lib.VGG_WEIGHTS_FILE
    with h5py.File(vgg_file, "r+") as h5_file:
        del h5_file["conv5_3/weight"]
        h5_file["conv5_3"].create_dataset("weight", data=np.zeros((3, 3, 512, 256), np.float32))
    with pytest.raises(lpips_lib.LPIPSUnavailable, match=r"conv5_3/weight.*\(3, 3, 512, 512\)"):
        lpips_lib.LPIPSMetric(tmp_path)

    vgg_file.write_text("not HDF5")
    with pytest.raises(lpips_lib.LPIPSUnavailable, match="not a readable HDF5 file"):
        lpips_lib.LPIPSMetric(tmp_path)


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "complaint"),
    [
        ((2, 32, 32, 1), (2, 32, 32, 3), "differ in shape"),
        ((2, 32, 32), (2, 32, 32), "NHWC"),
        ((2, 8, 8, 1), (2, 8, 8, 1), "at least 16x16"),
    ],
)
def test_bad_image_shapes_are_rejected(metric, x_shape, y_shape, complaint):
    with pytest.raises(ValueError, match=complaint):
        metric(np.zeros(x_shape, np.float32), np.zeros(y_shape, np.float32))
