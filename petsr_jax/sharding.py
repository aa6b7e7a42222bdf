"""Data parallelism with `jax.sharding`: one `data` mesh axis over every device of every process.

Params and optimizer state are replicated, batches are split along their first axis. The same
code runs on one CPU, eight GPUs or several hosts (after `jax.distributed.initialize`); there is
no `pmap`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D `data` mesh. Auto axis types, so reshapes of sharded arrays keep working."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def local_batch_to_global(local: dict, mesh) -> dict:
    """This process's part of a global batch (numpy) → global arrays sharded over `data`."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def full_batch_to_global(full: np.ndarray, mesh) -> jax.Array:
    """A batch every process holds whole (evaluation) → a global array sharded over `data`."""
    full = np.asarray(full)
    return jax.make_array_from_callback(full.shape, batch_sharded(mesh), lambda idx: full[idx])


def replicate(tree, mesh):
    """Place a pytree of host or device arrays replicated on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda idx: np.asarray(x)[idx]
        ),
        tree,
    )
