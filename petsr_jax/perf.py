"""Speed: XLA CPU settings, FLOP accounting and the measurements behind `launch/benchmark.py`.

`configure_cpu(relaunch=True)` is called by the launch scripts before JAX starts. It does two
things, both process-wide and only on CPU:

* XLA flags. jaxlib 0.10's default XLA:CPU pipeline hands convolutions to its YNNPACK fusions,
  whose weight-gradient convolution is several times slower than Eigen's; turning them off
  roughly doubles the DeepSR train step when XLA computes the convolutions (measured in
  `../shared/notes/xla-cpu-performance.md` and by `launch/benchmark.py`). The flags are read
  only when the backend starts, hence a function to call first thing.
* The allocator (`use_tcmalloc`): XLA:CPU allocates each step's temporaries — about 0.6 GB
  for DeepSR at 16×48×48 — as one block that glibc maps afresh and page-faults in every step.
  Where tcmalloc is installed the script re-executes itself with it preloaded, which keeps the
  block for reuse: the DeepSR train step ran 6–16 % faster (README, "Speed").
  `PETSR_ALLOCATOR=system` keeps glibc.

The benchmarks time the project's own code paths: `petsr_jax.train.make_train_step` (degrade
inside the jitted step, MSE, Adam), the model's forward pass, slice-batched inference over a
whole volume (`make_batched_forward`), and the Grain training loader of `petsr_jax.data`. FLOPs
count 2 per multiply-add of every convolution of the forward pass, 3× that for a train step,
exactly as `../shared/bench/torch_reference.py` does, so the two scripts' `gflops_per_s` compare
directly.
"""

from __future__ import annotations

import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

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

# Dense peak TFLOP/s per device kind (substring of `device.device_kind`, first match wins) and
# compute dtype, from the vendors' data sheets. "float32" is the TF32 tensor-core peak, which is
# what XLA uses for float32 convolutions on these GPUs at JAX's default matmul precision.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.0, "float32": 494.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.0, "float32": 183.0}),
)

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


# --------------------------------------------------------------------------- XLA configuration


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
        return platforms.split(",")[0].strip().lower() != "cpu"
    from importlib import metadata

    for name in _ACCELERATOR_PLUGINS:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            continue
    return False


# ------------------------------------------------------------------------------- the allocator

ALLOCATOR_ENV = "PETSR_ALLOCATOR"
# gperftools' tcmalloc, as Debian/Ubuntu (`libtcmalloc-minimal4`), Fedora and conda ship it.
TCMALLOC_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def find_tcmalloc(search_dirs: Iterable[str] | None = None) -> str | None:
    """Path of an installed tcmalloc shared library, or None.

    Looks in this Python's prefix (conda environments), `$CONDA_PREFIX` and the system library
    directories, in that order.
    """
    import sysconfig

    if search_dirs is None:
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        search_dirs = [
            os.path.join(sys.prefix, "lib"),
            os.path.join(os.environ.get("CONDA_PREFIX", sys.prefix), "lib"),
            *(os.path.join(root, multiarch) for root in ("/usr/lib", "/lib") if multiarch),
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
        ]
    for directory in search_dirs:
        for name in TCMALLOC_LIBRARIES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def tcmalloc_loaded() -> bool:
    """Whether this process runs on tcmalloc (it is mapped into the process)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libtcmalloc" in line for line in maps)
    except OSError:
        return False


def _allocator_choice(environ) -> str:
    choice = environ.get(ALLOCATOR_ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if choice not in ("tcmalloc", "system"):
        raise ValueError(f"{ALLOCATOR_ENV} must be 'tcmalloc' or 'system', not {choice!r}")
    return choice


def _can_reexecute() -> bool:
    """A script or `-m`/`-c` run can be re-executed with its argv; a REPL or notebook cannot."""
    import multiprocessing

    argv = getattr(sys, "orig_argv", None)
    if not argv or len(argv) < 2 or hasattr(sys, "ps1") or sys.flags.interactive:
        return False
    if multiprocessing.parent_process() is not None:  # a worker: its parent decided
        return False
    return "ipykernel" not in sys.modules and sys.argv[0] not in ("", "-")


def use_tcmalloc(execve: Callable = os.execve) -> bool:
    """Run this process on tcmalloc: re-execute it once with tcmalloc in `LD_PRELOAD`.

    Why: XLA:CPU allocates each step's temporaries — about 0.6 GB for DeepSR at 16×48×48 — as
    one block from a worker thread. glibc serves a block that large from a fresh `mmap` every
    step and unmaps it at the end, so every step first-touches 0.6 GB again (~143,000 page
    faults, ~10 % of the step). tcmalloc keeps freed blocks for reuse, as PyTorch's CPU
    allocator effectively does for its tensors. (glibc cannot be told to: its `mmap` threshold is
    capped at 32 MiB, and keeping large blocks in its main arena fragmented the heap in about
    one fresh process in five, to 4 GB.) The preload has to be in place before the process
    starts, hence the re-execution: same interpreter, same arguments, same PID.

    Returns True when the process already runs on tcmalloc, False when it stays on the system
    allocator: `PETSR_ALLOCATOR=system`, no tcmalloc installed (`apt-get install
    libtcmalloc-minimal4`), an accelerator run, a notebook or REPL, or a preload that did not
    take. Does not return when it re-executes. Call it first thing in a script, before threads.
    """
    if tcmalloc_loaded():
        return True
    if _allocator_choice(os.environ) == "system" or sys.platform != "linux":
        return False
    if _accelerator_expected(os.environ) or not _can_reexecute():
        return False
    library = find_tcmalloc()
    if library is None:
        log.info(
            "tcmalloc not found: CPU training runs ~10%% slower on glibc's allocator "
            "(apt-get install libtcmalloc-minimal4; %s=system silences this)",
            ALLOCATOR_ENV,
        )
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if library in preload.replace(":", " ").split():
        log.warning("%s is in LD_PRELOAD but not loaded; staying on the system allocator", library)
        return False
    env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip())
    # tcmalloc reports every allocation over 1 GiB on stderr; XLA's temporaries for large
    # batches are that big by design.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 42))
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return False  # only reached when `execve` is replaced (tests)


def configure_cpu(environ=None, *, relaunch: bool = False) -> str | None:
    """Add the measured XLA:CPU flags to `XLA_FLAGS`; call before JAX's first computation.

    With `relaunch=True` (the launch scripts) it first moves the process onto tcmalloc by
    re-executing it (`use_tcmalloc`), so call it first thing. Does nothing (returns None) when an
    accelerator will be used or when the JAX backend has already started (a warning then, since
    the flags could no longer apply). The flags are left out when the running jaxlib was not
    measured or the user's `XLA_FLAGS` already choose the YNN fusion setting. Returns the flag
    string it added otherwise. `environ` defaults to `os.environ`; only then is this process
    ever re-executed (another mapping is not this process's environment).
    """
    from jax._src import xla_bridge

    this_process = environ is None
    environ = os.environ if environ is None else environ
    if _accelerator_expected(environ):
        return None
    started = xla_bridge.backends_are_initialized()
    if relaunch and this_process and not started:
        use_tcmalloc()
    flags = CPU_XLA_FLAGS.get(_jaxlib_version() or (0, 0))
    if flags is None or YNN_FUSION_FLAG in environ.get("XLA_FLAGS", ""):
        return None
    current = environ.get("XLA_FLAGS", "")
    if started:
        log.warning(
            "JAX already started; %s not applied. Call petsr_jax.perf.configure_cpu() before "
            "the first JAX computation (CPU training then runs about 2x slower).",
            flags,
        )
        return None
    environ["XLA_FLAGS"] = f"{current} {flags}".strip()
    return flags


def ynn_fusions_in(compiled_text: str) -> bool:
    """Whether a compiled program's HLO text still routes work through YNNPACK fusions."""
    return "ynn_fusion" in compiled_text


# ---------------------------------------------------------------------------- FLOPs and peaks


def forward_flops_per_pixel(params) -> int:
    """FLOPs per output pixel of one forward pass: 2 per multiply-add of every convolution.

    Read from the kernels' shapes `[kh, kw, in, out]`, which holds because every convolution of
    both networks is stride 1 with "SAME" padding, so each runs once per output pixel.
    """
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if getattr(path[-1], "key", None) == "kernel" and len(leaf.shape) == 4:
            kh, kw, cin, cout = leaf.shape
            total += 2 * kh * kw * cin * cout
    return total


def peak_flops(device, dtype: str) -> float | None:
    """Dense peak FLOP/s of `device` for compute `dtype`, or None when unknown (CPUs)."""
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, peaks in PEAK_TFLOPS:
        if name in kind:
            return peaks.get(dtype, peaks["float32"]) * 1e12
    return None


# -------------------------------------------------------------------------------- measurement


def time_calls(
    fn: Callable[[], object], steps: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `steps` calls of `fn` after `warmup` untimed ones.

    `fn` must block until its work is done (return only after `block_until_ready`), so each
    time covers the whole computation, as PyTorch's eager steps do. CPU seconds (all threads)
    barely change when other jobs share the cores, so they compare implementations on a busy
    machine where wall times cannot.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def host_peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory(device, compiled=None) -> dict:
    """Peak memory: the device allocator's peak where it reports one (GPUs), else host RSS.

    `xla_temp_bytes` is XLA's planned scratch for `compiled`, the part a layout or remat change
    moves; it is the comparable figure across backends.
    """
    out: dict = {}
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["peak_memory_bytes"] = int(stats["peak_bytes_in_use"])
        out["peak_memory_kind"] = "device"
    else:
        out["peak_memory_bytes"] = host_peak_rss_bytes()
        out["peak_memory_kind"] = "host_rss"
    if compiled is not None:
        try:
            analysis = compiled.memory_analysis()
            out["xla_temp_bytes"] = int(analysis.temp_size_in_bytes)
        except (AttributeError, NotImplementedError, RuntimeError):
            pass
    return out


def _environment(device) -> dict:
    import jax

    return {
        "framework": "jax",
        "jax": jax.__version__,
        "backend": device.platform,
        "device": getattr(device, "device_kind", str(device)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "allocator": "tcmalloc" if tcmalloc_loaded() else "system",
    }


def _rates(result: dict, times, items: int, flops: float | None, device, dtype):
    """Fill per-step time (median, like torch_reference.py), throughput, GFLOP/s and MFU."""
    wall, cpu = times
    dt = statistics.median(wall)
    result["seconds_per_step"] = dt
    result["seconds_per_step_min"] = min(wall)
    result["cpu_seconds_per_step"] = statistics.median(cpu)
    result["images_per_s"] = items / dt
    if flops is None:
        result["gflops_per_s"] = None
        result["mfu"] = None
        return result
    result["gflops_per_s"] = flops / dt / 1e9
    peak = peak_flops(device, dtype)
    result["mfu"] = None if peak is None else flops / dt / peak
    return result


# ---------------------------------------------------------------------------- model benchmarks


def bench_config(
    model: str,
    blocks: int,
    precision: str,
    *,
    remat: bool = False,
    scale: int = 8,
    conv: str = "auto",
):
    """The project config for a benchmark run (the paper's networks at a given depth)."""
    from petsr_jax.config import build_config

    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    arg = f"scale={scale},compute_dtype={PRECISIONS[precision]},model.conv={conv}"
    if model == "deepsr":
        arg += f",model.num_blocks={blocks},model.remat={remat}"
    return build_config(model, arg)


def benchmark_train(
    model: str = "deepsr",
    blocks: int = 20,
    size: int = 96,
    batch: int = 4,
    *,
    precision: str = "fp32",
    steps: int = 5,
    warmup: int = 2,
    remat: bool = False,
    donate: bool = True,
    scale: int = 8,
    conv: str = "auto",
    seed: int = 0,
) -> dict:
    """Images/s, GFLOP/s and memory of the project's train step on random `size`² slices.

    The step is `petsr_jax.train.make_train_step` (degrade inside, MSE, Adam), jitted as
    training jits it (`train.jit_train_step`: state donated) unless `donate=False`.
    """
    import jax
    import numpy as np

    from petsr_jax import sharding, train
    from petsr_jax.models import count_params, create_model

    config = bench_config(model, blocks, precision, remat=remat, scale=scale, conv=conv)
    net = create_model(config)
    tx = train.make_optimizer(config)
    state = train.init_state(config, net, tx)
    step_fn = train.make_train_step(net, tx, scale)
    if donate:
        mesh = sharding.make_mesh()
        state = sharding.replicate(state, mesh)
        jitted = train.jit_train_step(step_fn, mesh)
    else:
        jitted = jax.jit(step_fn)
    hr = np.random.default_rng(seed).random((batch, size, size, 1), np.float32)
    batch_arrays = {"hr": jax.device_put(hr)}
    compiled = jitted.lower(state, batch_arrays).compile()

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        metrics["loss"].block_until_ready()

    times = time_calls(one_step, steps, warmup)
    device = jax.devices()[0]
    flops = 3 * forward_flops_per_pixel(state.params) * size * size * batch
    result = {
        **_environment(device),
        "model": model,
        "blocks": blocks if model == "deepsr" else None,
        "size": size,
        "batch": batch,
        "mode": "train",
        "precision": precision,
        "remat": remat,
        "donate": donate,
        "scale": scale,
        "conv": net.conv,
        "steps": steps,
        "params": count_params(state.params),
        "ynn_fusions": ynn_fusions_in(compiled.as_text()),
    }
    _rates(result, times, batch, flops, device, PRECISIONS[precision])
    result.update(peak_memory(device, compiled))
    return result


def _model_and_params(model: str, blocks: int, precision: str, size: int, conv: str, seed: int):
    import jax
    import jax.numpy as jnp

    from petsr_jax.models import create_model

    config = bench_config(model, blocks, precision, conv=conv)
    net = create_model(config)
    dummy = jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)
    params = net.init(jax.random.PRNGKey(seed), dummy)["params"]
    return net, params


def benchmark_infer(
    model: str = "deepsr",
    blocks: int = 20,
    size: int = 384,
    batch: int = 1,
    *,
    precision: str = "fp32",
    steps: int = 5,
    warmup: int = 1,
    conv: str = "auto",
    seed: int = 0,
) -> dict:
    """Forward-pass images/s and GFLOP/s on a resident batch (torch_reference.py's infer)."""
    import jax
    import numpy as np

    from petsr_jax.models import count_params

    net, params = _model_and_params(model, blocks, precision, size, conv, seed)
    forward = jax.jit(lambda p, x: net.apply({"params": p}, x))
    x = jax.device_put(np.random.default_rng(seed).random((batch, size, size, 1), np.float32))
    compiled = forward.lower(params, x).compile()
    times = time_calls(lambda: compiled(params, x).block_until_ready(), steps, warmup)
    device = jax.devices()[0]
    result = {
        **_environment(device),
        "model": model,
        "blocks": blocks if model == "deepsr" else None,
        "size": size,
        "batch": batch,
        "mode": "infer",
        "precision": precision,
        "conv": net.conv,
        "steps": steps,
        "params": count_params(params),
        "ynn_fusions": ynn_fusions_in(compiled.as_text()),
    }
    flops = forward_flops_per_pixel(params) * size * size * batch
    _rates(result, times, batch, flops, device, PRECISIONS[precision])
    result.update(peak_memory(device, compiled))
    return result


def make_batched_forward(apply_fn: Callable, params, batch_size: int):
    """`run(slices) -> out` over `[N, H, W]` numpy slices, `batch_size` slices on device at once.

    Batch k+1 is dispatched before batch k is copied back, so the copy overlaps the computation
    and at most two batches' activations are alive: memory is bounded by `batch_size`, not by
    the volume. A last, smaller batch gets its own compiled program (cached by `jax.jit` like the
    first) rather than zero padding, so no slice is computed twice or for nothing.
    `apply_fn(params, x)` maps NHWC to NHWC.
    """
    import jax
    import numpy as np

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    forward = jax.jit(apply_fn)

    def run(slices) -> np.ndarray:
        n, h, w = slices.shape
        out = np.empty((n, h, w), np.float32)
        pending = None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            chunk = np.asarray(slices[start:stop], np.float32)[..., None]
            result = forward(params, chunk)  # asynchronous: returns before the work is done
            if pending is not None:
                out[pending[0] : pending[1]] = np.asarray(pending[2])[..., 0]
            pending = (start, stop, result)
        if pending is not None:
            out[pending[0] : pending[1]] = np.asarray(pending[2])[..., 0]
        return out

    return run


def benchmark_volume(
    model: str = "deepsr",
    blocks: int = 20,
    size: int = 384,
    batch: int = 4,
    *,
    slices: int = 89,
    precision: str = "fp32",
    steps: int = 1,
    warmup: int = 1,
    conv: str = "auto",
    seed: int = 0,
) -> dict:
    """Slices/s of a whole `[slices, size, size]` volume through the network, in slice batches.

    Timed from host numpy to host numpy, the way enhancing a scan runs. A warm-up runs one
    full batch and the last partial one (compiling both programs), not whole volumes: a
    384² volume takes minutes on a CPU.
    """
    import jax
    import numpy as np

    from petsr_jax.models import count_params

    net, params = _model_and_params(model, blocks, precision, size, conv, seed)
    run = make_batched_forward(lambda p, x: net.apply({"params": p}, x), params, batch)
    volume = np.random.default_rng(seed).random((slices, size, size), np.float32)
    for _ in range(warmup):
        run(volume[: min(batch, slices)])
        if slices % batch:
            run(volume[: slices % batch])
    times = time_calls(lambda: run(volume), steps, 0)
    device = jax.devices()[0]
    result = {
        **_environment(device),
        "model": model,
        "blocks": blocks if model == "deepsr" else None,
        "size": size,
        "batch": batch,
        "slices": slices,
        "mode": "volume",
        "precision": precision,
        "conv": net.conv,
        "steps": steps,
        "params": count_params(params),
    }
    flops = forward_flops_per_pixel(params) * size * size * slices
    _rates(result, times, slices, flops, device, PRECISIONS[precision])
    result["seconds_per_volume"] = result["seconds_per_step"]
    result["slices_per_s"] = result["images_per_s"]
    result.update(peak_memory(device))
    return result


# ------------------------------------------------------------------------------ data pipeline


def _batch_times(iterator: Iterable, batches: int, warmup: int) -> list[float]:
    it = iter(iterator)
    for _ in range(warmup):
        next(it)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - start)
    return times


def benchmark_loader(
    size: int = 384,
    batch: int = 16,
    *,
    crop: int = 0,
    num_slices: int = 178,
    workers: int = 0,
    steps: int = 50,
    warmup: int = 5,
    seed: int = 0,
) -> dict:
    """High-resolution slices/s of the training loader (`petsr_jax.data`) over a memory map.

    The slices live in a temporary `.npy` file opened memory-mapped, as training's slice cache
    is, and go through the same random crop, flips and batching. Per-batch times are summed into
    slices/s, so a prefetching loader (`workers > 0`) shows its steady-state rate.
    """
    import numpy as np

    from petsr_jax import data

    with tempfile.TemporaryDirectory(prefix="petsr_loader_bench_") as tmp:
        path = os.path.join(tmp, "hr.npy")
        hr = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.float32, shape=(num_slices, size, size)
        )
        hr[:] = np.random.default_rng(seed).random(hr.shape, np.float32)
        hr.flush()
        del hr
        ds = data.train_dataset(
            data.SliceSource(path), batch_size=batch, seed=seed, crop_size=crop, flip=True
        )
        times = _batch_times(data.train_iterator(ds, workers), steps, warmup)
    total = sum(times)
    side = crop or size
    return {
        "framework": "grain",
        "mode": "loader",
        "size": size,
        "crop": crop,
        "batch": batch,
        "workers": workers,
        "steps": steps,
        "seconds_per_step": total / steps,
        "images_per_s": steps * batch / total,
        "slices_per_s": steps * batch / total,
        "megabytes_per_s": steps * batch * side * side * 4 / total / 1e6,
        "gflops_per_s": None,
    }


def format_result(r: dict) -> str:
    """One human-readable line per result, in torch_reference.py's order of figures."""
    if r["mode"] == "loader":
        return (
            f"grain loader {r['size']}² crop {r['crop'] or 'none'} b{r['batch']} "
            f"workers {r['workers']}: {r['slices_per_s']:.1f} slices/s, "
            f"{r['megabytes_per_s']:.0f} MB/s, {r['seconds_per_step'] * 1e3:.1f} ms/batch"
        )
    what = (
        f"jax {r['model']} {r['mode']} {r['size']}x{r['size']} b{r['batch']} {r['precision']} "
        f"conv={r['conv']} allocator={r['allocator']}"
    )
    if r["mode"] == "volume":
        what += f" ({r['slices']} slices)"
    rate = "slices/s" if r["mode"] == "volume" else "img/s"
    ms = r["seconds_per_step"] * 1e3
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    mem = r.get("peak_memory_bytes")
    mem_text = f"{mem / 2**30:.2f} GiB ({r['peak_memory_kind']})" if mem else "n/a"
    if "xla_temp_bytes" in r:
        mem_text += f", XLA temp {r['xla_temp_bytes'] / 2**30:.2f} GiB"
    per = "ms/volume" if r["mode"] == "volume" else "ms/step"
    return (
        f"{what}: {r['images_per_s']:.2f} {rate}, {r['gflops_per_s']:.1f} GFLOP/s, "
        f"{ms:.1f} {per}, MFU {mfu}, peak memory {mem_text}, params {r['params']:,}"
    )
