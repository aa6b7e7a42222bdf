"""The one loop that runs a jitted function over many slices, batch by batch.

Evaluation, regional recovery, figures, `SuperResolver` (notebooks and `launch/enhance.py`) and
`launch/benchmark.py` all call `map_batches`, so a benchmark times exactly what users run and a
fix here reaches every caller. What it guarantees:

* one batch shape per input shape: the last batch is zero-filled to the full size and its
  padding cut from the outputs, so a volume compiles once, not twice;
* with a mesh, batches padded to a multiple of its devices and sharded over `data`;
* batch k+1 is dispatched before batch k is copied to the host, so the copy overlaps the work
  while at most two batches are alive on the device.

`make_predict_fn` is the model's view of a slice, the run's `petsr_jax.task.Task`: degrade
(bicubic ×scale in the run's domain, or a scanner's PSF and noise), then the network (with
neighbouring slices and an MR-guided model's guidance channels beside the degraded PET), then
the task's last step (activity kept).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import numpy as np

from petsr_jax import sharding
from petsr_jax.task import Task


def make_predict_fn(model, task: Task):
    """`predict(params, hr) -> (lr_up, sr, target)` for NHWC slices in the task's domain (not
    jitted): the network's input (its centre slice), its output and what it is scored against.

    `hr` is the slices, or a batch dict holding them as `"hr"` and, where the task needs them,
    the neighbouring slices as `"context"` and an MR-guided model's channels as `"guide"`.
    """

    def predict(params, hr):
        batch = hr if isinstance(hr, Mapping) else {"hr": hr}
        return task.predict(model, params, batch)

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
def jitted_predict(model, task: Task, mesh):
    """`make_predict_fn` jitted on `mesh`, compiled once per (model, task, mesh)."""
    return jit_on_mesh(make_predict_fn(model, task), mesh)


def predict_slices(
    params, hr: np.ndarray, *, model, task: Task, mesh, batch_size=8, guide=None, context=None
):
    """(lr_up, sr, target) as numpy `[N, H, W]` for `[N, H, W]` slices, in the units of `hr`:
    the network runs in the task's domain (`data.Domain`) and its images are mapped back per
    slice. `guide` is an MR-guided model's `[N, H, W, C]` guidance channels of the same slices,
    `context` their `[N, H, W, 2n]` neighbours (`data.context_slices`) when the task needs them.
    """
    domain = task.degradation.domain
    encoded, low, span = domain.encode(hr)
    inputs = {"hr": encoded[..., None], "index": np.arange(len(encoded), dtype=np.int32)}
    if guide is not None:
        inputs["guide"] = guide
    if context is not None:
        inputs["context"] = context
    images = map_batches(
        jitted_predict(model, task, mesh), params, inputs, batch_size=batch_size, mesh=mesh
    )
    return tuple(domain.decode(image[..., 0], low, span) for image in images)
