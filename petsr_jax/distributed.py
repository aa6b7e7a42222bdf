"""Multi-process training on JAX's own distributed runtime.

`initialize(config)` calls `jax.distributed.initialize` when asked: `distributed.mode="on"`, a
coordinator address in the config, or (mode "auto") a cluster scheduler's environment that JAX
detects by itself (SLURM with more than one task, Open MPI, ...). After it, `jax.devices()` spans
every process, the `data` mesh covers them all, Grain reads each process's share of every global
batch, and only process 0 writes logs and result files.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _cluster_detected() -> bool:
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_ENV)


def initialize(config) -> bool:
    """Start `jax.distributed` if the config or the environment asks for it; True if started."""
    d = config.distributed
    if d.mode == "off":
        return False
    explicit = bool(d.coordinator_address) or d.mode == "on"
    if not explicit and not _cluster_detected():
        return False
    kwargs = {}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kwargs["process_id"] = d.process_id
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
