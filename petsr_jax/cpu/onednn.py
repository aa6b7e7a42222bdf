"""oneDNN convolutions for XLA:CPU: the fastest CPU path for both networks.

XLA:CPU computes convolutions and their gradients with Eigen tensor contractions; on this
project's AVX-512 CPUs those reach ~140–175 GFLOP/s for DeepSR's 64-channel 3×3 layers, while
oneDNN's JIT kernels — the ones PyTorch runs on CPUs — reach ~165–225 for the same layers
(measured inside JAX). Here XLA FFI custom calls into oneDNN (`native/onednn_conv.cc`) compute
the forward pass (bias fused) and the backward pass, tied together by a custom VJP, so a whole
jitted train step uses them and XLA fuses everything else. The backward pass is one call for the
input, kernel and bias gradients: as separate calls they would be independent, XLA:CPU would run
them concurrently, and two OpenMP teams would then fight over the same cores. (Fusing the
following ReLU or residual addition into the forward call as oneDNN post-ops was measured
slower: 16.5 / 17.7 ms against 13.4 ms per 16×48×48×64 convolution.)

The library is compiled on first use — once per machine, ~5 s with g++ — from the source shipped
in the package against the oneDNN wheels of the `cpu` extra (`pip install -e ".[cpu]"`:
`onednn-cpu-gomp` and its headers, `onednn-devel-cpu-gomp`) and the XLA FFI headers that jaxlib
ships, then cached under `$PETSR_CACHE_DIR/native` (default `~/.cache/petsr_jax/native`) by a
hash of everything that went into it. When something is missing (no compiler, no oneDNN wheel,
not x86-64 Linux), `available()` is False, `unavailable_reason()` says why, and
`model.conv="auto"` falls back to `petsr_jax.cpu.fast_conv`. `PETSR_ONEDNN=0` turns it off.

`Conv` is `fast_conv.Conv` with its float32 convolutions computed here; other dtypes (bf16
compute) keep `fast_conv`'s. GPUs never get here (`petsr_jax.cpu.resolve_conv`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from petsr_jax.cpu import fast_conv

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "onednn_conv.cc"
_TARGETS = {
    "forward": "petsr_onednn_conv_forward",
    "backward": "petsr_onednn_conv_backward",
}
_SYMBOLS = {
    "forward": "PetsrConvForward",
    "backward": "PetsrConvBackward",
}
_LIB_DIST, _HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"


class OneDnnUnavailable(RuntimeError):
    """The oneDNN path cannot be built or loaded here; the message says why."""


def _cache_dir() -> Path:
    root = os.environ.get("PETSR_CACHE_DIR") or Path.home() / ".cache" / "petsr_jax"
    return Path(root) / "native"


def _find_in_dist(dist: str, suffix: str) -> Path:
    """The installed file of distribution `dist` whose path ends with `suffix`."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        raise OneDnnUnavailable(
            f"the Python package {dist} is not installed (pip install -e '.[cpu]')"
        ) from None
    for f in files:
        if ("/" + str(f).replace("\\", "/")).endswith("/" + suffix):
            path = Path(metadata.distribution(dist).locate_file(f)).resolve()
            if path.exists():
                return path
    raise OneDnnUnavailable(f"{dist} is installed but has no {suffix}")


def build_inputs() -> dict[str, Path]:
    """Compiler, headers and library the build needs; raises `OneDnnUnavailable` if any lacks."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OneDnnUnavailable(f"needs x86-64 Linux, this is {sys.platform} {platform.machine()}")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise OneDnnUnavailable("no C++ compiler found (install g++ or set CXX)")
    header = _find_in_dist(_HEADERS_DIST, "include/oneapi/dnnl/dnnl.hpp")
    library = _find_in_dist(_LIB_DIST, "libdnnl.so.3")
    return {
        "compiler": Path(compiler),
        "dnnl_include": header.parents[2],
        "dnnl_lib": library,
        "ffi_include": Path(jax.ffi.include_dir()),
    }


def _library_path(inputs: dict[str, Path]) -> Path:
    """Cache path keyed by the source, the toolchain paths and the jaxlib / oneDNN versions."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for key in sorted(inputs):
        digest.update(f"{key}={inputs[key]}".encode())
    for dist in ("jaxlib", _LIB_DIST):
        digest.update(f"{dist}={metadata.version(dist)}".encode())
    return _cache_dir() / f"petsr_onednn_conv-{digest.hexdigest()[:16]}.so"


def build(inputs: dict[str, Path] | None = None) -> Path:
    """Compile the library if the cache lacks it; returns its path.

    Written to a temporary name and renamed into place, so concurrent processes (multi-host runs
    start several at once) never load a half-written file.
    """
    inputs = inputs or build_inputs()
    target = _library_path(inputs)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [
        str(inputs["compiler"]),
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",
        f"-I{inputs['ffi_include']}",
        f"-I{inputs['dnnl_include']}",
        str(SOURCE),
        str(inputs["dnnl_lib"]),
        f"-Wl,-rpath,{inputs['dnnl_lib'].parent}",
        "-o",
        tmp,
    ]
    log.info("compiling the oneDNN convolution library (once per machine): %s", target.name)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OneDnnUnavailable(
                f"compiling {SOURCE.name} failed:\n{result.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load() -> tuple[bool, str]:
    """Build, load and register the FFI targets once per process: (ok, reason if not)."""
    if os.environ.get("PETSR_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "turned off by PETSR_ONEDNN"
    try:
        library = ctypes.CDLL(str(build()))
        for kind, target in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(library, _SYMBOLS[kind]))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except Exception as e:  # any failure here means: compute convolutions in XLA instead
        log.warning("oneDNN convolutions unavailable, fast_conv computes them instead: %s", e)
        return False, str(e)
    return True, ""


def available() -> bool:
    """True when the oneDNN convolutions are built, loaded and registered with XLA:CPU."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _load()[1]


def _require() -> None:
    ok, reason = _load()
    if not ok:
        raise OneDnnUnavailable(f"oneDNN convolutions are unavailable: {reason}")


def _out(x, kernel):
    return jax.ShapeDtypeStruct((*x.shape[:3], kernel.shape[3]), jnp.float32)


def _backward(x, kernel, g):
    outs = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
        jax.ShapeDtypeStruct(kernel.shape[3:], jnp.float32),
    )
    return jax.ffi.ffi_call(_TARGETS["backward"], outs)(x, kernel, g.astype(jnp.float32))


@jax.custom_vjp
def conv2d_same(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """`conv(x, kernel) + bias` in oneDNN: float32 NHWC input, HWIO kernel with odd sides,
    stride 1, "SAME" padding — the same maths as `fast_conv.conv2d_same`."""
    _require()
    return jax.ffi.ffi_call(_TARGETS["forward"], _out(x, kernel))(x, kernel, bias)


def _conv_fwd(x, kernel, bias):
    return conv2d_same(x, kernel, bias), (x, kernel)


def _conv_bwd(saved, g):
    return _backward(*saved, g)


conv2d_same.defvjp(_conv_fwd, _conv_bwd)


def supports(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `conv2d_same` takes these operands (float32, 4-D, odd kernel sides)."""
    return (
        x.ndim == 4
        and kernel.ndim == 4
        and x.dtype == np.float32
        and kernel.dtype == np.float32
        and kernel.shape[0] % 2 == 1
        and kernel.shape[1] % 2 == 1
    )


class Conv(fast_conv.Conv):
    """`fast_conv.Conv` whose float32 convolutions run in oneDNN (others keep `fast_conv`'s)."""

    def convolve(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        if supports(x, kernel):
            return conv2d_same(x, kernel, bias)
        return super().convolve(x, kernel, bias)
