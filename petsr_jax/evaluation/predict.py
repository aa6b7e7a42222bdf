"""The one loop that runs a jitted function over many slices, batch by batch.

Evaluation, regional recovery, figures, `SuperResolver` (notebooks and `launch/enhance.py`) and
`launch/benchmark.py` all call `map_batches`, so a benchmark times exactly what users run and a
fix here reaches every caller. What it guarantees:

* one batch shape per input shape: the last batch is zero-filled to the full size and its
  padding cut from the outputs, so a volume compiles once, not twice;
* with a mesh, batches padded to a multiple of its devices and sharded over `data`;
* batch k+1 is dispatched before batch k is copied to the host, so the copy overlaps the work
  while at most two batches are alive on the device.

`make_predict_fn` is the model's view of a slice: degrade by `scale` in the run's domain, then
the network (with an MR-guided model's guidance channels beside the degraded PET).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import numpy as np

from petsr_jax import data, sharding
from petsr_jax.data import mr
from petsr_jax.data.degrade import degrade


def make_predict_fn(model, scale: int, domain: str = "physical"):
    """`predict(params, hr) -> (lr_up, sr)` for NHWC slices in `domain` (not jitted).

    `hr` is the slices, or a batch dict holding them as `"hr"` and, for an MR-guided model, the
    guidance channels as `"guide"` (`petsr_jax.data.mr`); other keys are ignored.
    """

    def predict(params, hr):
        batch = hr if isinstance(hr, Mapping) else {"hr": hr}
        lr_up = degrade(batch["hr"], scale, domain)
        return lr_up, model.apply({"params": params}, mr.network_input(lr_up, batch))

    return predict


def batch_size_for(n: int, batch_size: int, mesh=None) -> int:
    """The one padded batch size of `n` items: at most `batch_size` (rounded up to a multiple
    of the mesh's devices), at least one item per device."""
    devices = 1 if mesh is None else mesh.size
    size = max(1, min(batch_size, n))
    return -(-size // devices) * devices


def _padded(array: np.ndarray, start: int, stop: int, size: int) -> np.ndarray:
    part = np.asarray(array[start:stop])
    if part.shape[0] == size:
        return part
    padded = np.zeros((size,) + part.shape[1:], part.dtype)
    padded[: stop - start] = part
    return padded


def map_batches(
    fn: Callable,
    params,
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    *,
    batch_size: int,
    mesh=None,
    progress: Callable[[int], None] | None = None,
):
    """`fn(params, batch)` over the leading axis of `inputs`; its outputs as numpy, concatenated.

    `inputs` is one array or a dict of arrays with the same leading length (numpy or
    memory-mapped: only one batch is read at a time); `fn` gets the same kind. `fn` returns a
    pytree of arrays whose leading axis is the batch. `progress(k)` is called after every `k`
    items. With `mesh`, every batch is sharded over its `data` axis (every process passes the
    whole `inputs`).
    """
    single = not isinstance(inputs, Mapping)
    arrays = {"x": inputs} if single else dict(inputs)
    n = len(next(iter(arrays.values())))
    size = batch_size_for(n, batch_size, mesh)
    parts: list = []
    pending = None

    def collect(count, result):
        parts.append(jax.tree.map(lambda r: np.asarray(r)[:count], result))
        if progress is not None:
            progress(count)

    for start in range(0, n, size):
        stop = min(start + size, n)
        batch = {k: _padded(v, start, stop, size) for k, v in arrays.items()}
        if mesh is not None:
            batch = {k: sharding.full_batch_to_global(v, mesh) for k, v in batch.items()}
        result = fn(params, batch["x"] if single else batch)  # asynchronous dispatch
        if pending is not None:
            collect(*pending)
        pending = (stop - start, result)
    if pending is not None:
        collect(*pending)
    if not parts:
        return None
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *parts)


def jit_on_mesh(fn: Callable, mesh):
    """`fn(params, batch)` jitted with params replicated and the batch sharded over `data`."""
    rep = sharding.replicated(mesh)
    return jax.jit(fn, in_shardings=(rep, sharding.batch_sharded(mesh)), out_shardings=rep)


@functools.lru_cache(maxsize=16)
def jitted_predict(model, scale: int, mesh, domain: str = "physical"):
    """`make_predict_fn` jitted on `mesh`, compiled once per (model, scale, mesh, domain)."""
    return jit_on_mesh(make_predict_fn(model, scale, domain), mesh)


def predict_slices(
    params, hr: np.ndarray, *, model, scale: int, mesh, domain="physical", batch_size=8, guide=None
):
    """(lr_up, sr) as numpy `[N, H, W]` for `[N, H, W]` slices, in the units of `hr`: the
    network runs in `domain` (`data.to_domain`) and its images are mapped back per slice.
    `guide` is an MR-guided model's `[N, H, W, C]` guidance channels of the same slices."""
    encoded, low, span = data.to_domain(hr, domain)
    inputs = encoded[..., None] if guide is None else {"hr": encoded[..., None], "guide": guide}
    lr_up, sr = map_batches(
        jitted_predict(model, scale, mesh, domain),
        params,
        inputs,
        batch_size=batch_size,
        mesh=mesh,
    )
    return tuple(data.from_domain(image[..., 0], low, span) for image in (lr_up, sr))
