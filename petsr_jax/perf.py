"""Speed: XLA CPU settings, FLOP accounting and the measurements behind `launch/benchmark.py`.

`configure_cpu()` is called by the launch scripts before JAX starts. On this project's CPUs the
default XLA:CPU pipeline of jaxlib 0.10 hands convolutions to its YNNPACK fusions, whose
weight-gradient convolution is several times slower than Eigen's; turning those fusions off
roughly doubles the DeepSR train step (measured in `../shared/notes/xla-cpu-performance.md` and by
`launch/benchmark.py`). The flag is process-wide and only read when the backend starts, hence a
function to call first thing rather than a setting inside the library.

The benchmarks time the project's own code paths: `petsr_jax.train.make_train_step` (degrade
inside the jitted step, MSE, Adam), the model's forward pass, slice-batched inference over a whole
volume, and the Grain training loader. FLOPs count 2 per multiply-add of every convolution of the
forward pass, 3× that for a train step, exactly as `../shared/bench/torch_reference.py` does, so
the two scripts' `gflops_per_s` compare directly.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"

# XLA:CPU flags per jaxlib (major, minor) they were measured on. A flag an XLA build does not
# know aborts the process at start-up, so nothing is set for versions not measured here; after an
# upgrade, measure with `launch/benchmark.py` and add the version.
CPU_XLA_FLAGS: dict[tuple[int, int], str] = {
    # Empty value: no YNNPACK fusions at all, convolutions (and their gradients) go to Eigen.
    (0, 10): f"{YNN_FUSION_FLAG}=",
}

# Accelerator plugins whose presence means computations will not run on XLA:CPU.
_ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm7-plugin", "libtpu")


def _jaxlib_version() -> tuple[int, int] | None:
    from importlib import metadata

    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _accelerator_expected(environ) -> bool:
    """True when JAX will pick a GPU/TPU: an explicit platform list, else an installed plugin."""
    platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", ""))
    if platforms:
        return platforms.split(",")[0].strip().lower() not in ("cpu", "")
    from importlib import metadata

    for name in _ACCELERATOR_PLUGINS:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            continue
    return False


def configure_cpu(environ=None) -> str | None:
    """Add the measured XLA:CPU flags to `XLA_FLAGS`; call before JAX's first computation.

    Does nothing (returns None) when an accelerator will be used, when the running jaxlib was
    not measured, when the user's `XLA_FLAGS` already choose the YNN fusion setting, or when the
    JAX backend has already started (a warning then, since the flag could no longer apply).
    Returns the flag string it added otherwise. `environ` defaults to `os.environ`.
    """
    environ = os.environ if environ is None else environ
    flags = CPU_XLA_FLAGS.get(_jaxlib_version() or (0, 0))
    if flags is None or _accelerator_expected(environ):
        return None
    current = environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in current:
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        log.warning(
            "JAX already started; %s not applied. Call petsr_jax.perf.configure_cpu() before "
            "the first JAX computation (CPU training then runs about 2x slower).",
            flags,
        )
        return None
    environ["XLA_FLAGS"] = f"{current} {flags}".strip()
    return flags
