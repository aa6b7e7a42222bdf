"""Multi-process training on JAX's own distributed runtime.

`initialize(config)` calls `jax.distributed.initialize` when asked: `distributed.mode="on"`, a
coordinator address in the config or in `$JAX_COORDINATOR_ADDRESS`, or (mode "auto") a job step
of several tasks that JAX's cluster detection understands (SLURM `srun`, Open MPI `mpirun`).
After it, `jax.devices()` spans every process, the `data` mesh covers them all, Grain reads each
process's share of every global batch, Orbax saves and restores from every process, and only
process 0 writes logs and result files.

It must run before anything starts JAX's backend (the first `jax.devices()` or computation), so
launch scripts call it first thing after parsing flags. On CPUs, processes exchange gradients
through Gloo (`jax_cpu_collectives_implementation`), which is how the multi-process tests run on
one machine.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """`jax.distributed` could not start; the message names the config fields to set."""


def _int_env(environ, name: str) -> int:
    try:
        return int(environ.get(name, "") or 0)
    except ValueError:
        return 0


def cluster_detected(environ=None) -> bool:
    """True inside a job step of several tasks that `jax.distributed` can configure by itself.

    SLURM counts the tasks of the running `srun` step (`SLURM_STEP_NUM_TASKS`), not of the whole
    allocation: a single `python` in an `sbatch` script of `--ntasks=8` is one process, and
    starting the runtime there would wait for seven processes that never come.
    """
    environ = os.environ if environ is None else environ
    if "SLURM_STEP_NUM_TASKS" in environ:
        return _int_env(environ, "SLURM_STEP_NUM_TASKS") > 1
    return _int_env(environ, "OMPI_COMM_WORLD_SIZE") > 1


def initialize_kwargs(config, environ=None) -> dict | None:
    """The arguments for `jax.distributed.initialize`, or None when the run is single-process.

    Raises `DistributedError` for a config that asks for several processes but leaves out what
    JAX cannot find by itself.
    """
    environ = os.environ if environ is None else environ
    d = config.distributed
    if d.mode not in ("auto", "on", "off"):
        raise DistributedError(f"distributed.mode: expected 'auto', 'on' or 'off', got {d.mode!r}")
    if d.mode == "off":
        return None
    coordinator = d.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
    detected = cluster_detected(environ)
    if d.mode == "auto" and not coordinator and not detected:
        return None
    kwargs: dict = {}
    if d.coordinator_address:
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kwargs["process_id"] = d.process_id
    if not detected:
        missing = [
            field
            for field, given in (
                ("distributed.coordinator_address", bool(coordinator)),
                ("distributed.num_processes", d.num_processes > 0),
                ("distributed.process_id", d.process_id >= 0),
            )
            if not given
        ]
        if missing:
            raise DistributedError(
                "several processes were asked for (distributed.mode="
                f"{d.mode!r}{', a coordinator address' if coordinator else ''}) outside a "
                f"SLURM or Open MPI job step; set {', '.join(missing)} "
                "(e.g. --config.distributed.coordinator_address=host0:12345 "
                "--config.distributed.num_processes=2 --config.distributed.process_id=0)"
            )
    if d.num_processes > 0 and d.process_id >= d.num_processes:
        raise DistributedError(
            f"distributed.process_id: {d.process_id} is not below distributed.num_processes "
            f"{d.num_processes}; ids run 0 .. {d.num_processes - 1}"
        )
    return kwargs


def initialize(config) -> bool:
    """Start `jax.distributed` if the config or the environment asks for it; True if started."""
    kwargs = initialize_kwargs(config)
    if kwargs is None:
        return False
    # Gloo is jax 0.10's default; naming it keeps CPU runs working if that default changes.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "must be called before" in str(e):  # JAX's own check that its backend is not up yet
            raise DistributedError(
                "jax.distributed must start before JAX's backend, but something already used "
                "JAX (jax.devices(), an array, a computation); call "
                "petsr_jax.distributed.initialize first"
            ) from e
        raise _failed(kwargs, e) from e
    except (ValueError, TypeError) as e:
        raise _failed(kwargs, e) from e
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _failed(kwargs: dict, error: Exception) -> DistributedError:
    return DistributedError(
        f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
        f"failed: {error}. Check that every process got the same coordinator address and "
        "process count, distinct process ids, and that process 0 can listen on that port."
    )
