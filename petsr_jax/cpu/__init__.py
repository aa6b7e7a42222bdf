"""Everything that makes CPU runs fast, in one optional place the rest of the package never needs.

* `configure()` — the process set-up a launch script does first (`runtime`: the XLA:CPU flag,
  tcmalloc); a no-op when an accelerator will be used.
* `resolve_conv` / `conv_module` — which convolution module computes the networks' layers:
  flax's `nn.Conv` (what every GPU and TPU runs), `fast_conv.Conv` (a backward pass XLA:CPU
  computes faster) or `onednn.Conv` (oneDNN kernels compiled on first use; needs the `cpu`
  extra, `pip install -e ".[cpu]"`, and g++). All three hold the same parameters.

Importing this package loads neither kernel: they load when `conv_module` hands one out.
"""

from __future__ import annotations

from petsr_jax.cpu.runtime import configure

__all__ = ["CONVS", "configure", "conv_module", "resolve_conv"]

CONVS = ("auto", "flax", "cpu", "onednn")


def resolve_conv(conv: str = "auto", backend: str | None = None, devices: int | None = None) -> str:
    """The convolution `conv` stands for on this machine: "flax", "cpu" or "onednn".

    "auto": GPUs and TPUs take flax's (cuDNN-backed convolutions and gradients). A CPU process
    computing on one device takes oneDNN where it builds, else `fast_conv`. A CPU process with
    several devices (fake devices in tests) takes flax's too: the oneDNN custom call has no
    partitioning rule, so XLA would gather the whole batch onto every device. `backend` and
    `devices` default to JAX's (`jax.default_backend()`, `jax.device_count()`).
    """
    if conv not in CONVS:
        raise ValueError(f"model.conv must be one of {CONVS}, got {conv!r}")
    if conv != "auto":
        return conv
    import jax

    if (backend or jax.default_backend()) != "cpu":
        return "flax"
    if (jax.device_count() if devices is None else devices) > 1:
        return "flax"
    from petsr_jax.cpu import onednn

    return "onednn" if onednn.available() else "cpu"


def conv_module(name: str):
    """The module class for a resolved name; each is called like `flax.linen.Conv`."""
    if name == "flax":
        import flax.linen as nn

        return nn.Conv
    if name == "cpu":
        from petsr_jax.cpu.fast_conv import Conv

        return Conv
    if name == "onednn":
        from petsr_jax.cpu.onednn import Conv

        return Conv
    raise ValueError(f"no convolution module named {name!r}; resolve_conv gives flax, cpu, onednn")
