"""petsr_jax: PET image super-resolution (multi-scale SRCNN and DeepSR) in JAX/Flax.

Everything here works from a notebook without flags:

    import petsr_jax
    sr = petsr_jax.load("runs/deepsr_x8")      # trained params + config
    volume = petsr_jax.io.read_volume("scan/")  # DICOM folder or NIfTI file
    enhanced = sr(volume)
"""

from petsr_jax import io
from petsr_jax.data.degrade import degrade
from petsr_jax.volume import Volume

__all__ = ["Volume", "degrade", "io", "load"]


def load(workdir, **kwargs):
    """A trained super-resolver from a workdir (see `petsr_jax.inference.load`)."""
    from petsr_jax.inference import load as _load

    return _load(workdir, **kwargs)
