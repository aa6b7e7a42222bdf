"""Measurements behind `launch/benchmark.py`: the train step, inference, volumes and the loader.

The benchmarks time the project's own code paths: `petsr_jax.train.make_train_step` (degrade
inside the jitted step, MSE, Adam), the model's forward pass, a whole volume through
`evaluation.predict.predict_slices` (what enhancing a scan runs), and the Grain training loader
of `petsr_jax.data`. FLOPs count 2 per multiply-add of every convolution of the forward pass,
3× that for a train step, as the PyTorch reference benchmark of the same networks counts
them, so the two scripts' `gflops_per_s` compare directly. `conv` picks the convolution as
`model.conv` does.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

from petsr_jax.cpu.runtime import tcmalloc_loaded, ynn_fusions_in

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
            pass  # not every backend or jaxlib reports it; the figure is then simply left out
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


@dataclasses.dataclass(frozen=True)
class Network:
    """What a network benchmark runs: the paper's `model` ("srcnn" | "deepsr", `blocks` residual
    blocks), in batches of `batch` random `size`² slices, at a `precision` ("fp32" | "bf16"),
    with the convolution `conv` ("auto" | "flax" | "cpu" | "onednn", as `model.conv`)."""

    model: str = "deepsr"
    blocks: int = 20
    size: int = 96
    batch: int = 4
    precision: str = "fp32"
    conv: str = "auto"
    seed: int = 0


def bench_config(net: Network, *, remat: bool = False, scale: int = 8):
    """The project config for a benchmark run (the paper's networks at a given depth), with
    `model.conv` resolved to the convolution that will run ("flax", "cpu" or "onednn")."""
    from petsr_jax.config import build_config
    from petsr_jax.cpu import resolve_conv

    if net.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {net.precision!r}")
    arg = (
        f"scale={scale},compute_dtype={PRECISIONS[net.precision]},"
        f"model.conv={resolve_conv(net.conv)}"
    )
    if net.model == "deepsr":
        arg += f",model.num_blocks={net.blocks},model.remat={remat}"
    return build_config(net.model, arg)


def benchmark_train(
    net: Network,
    *,
    steps: int = 5,
    warmup: int = 2,
    remat: bool = False,
    donate: bool = True,
    scale: int = 8,
) -> dict:
    """Images/s, GFLOP/s and memory of the project's train step on random slices.

    The step is `petsr_jax.train.make_train_step` (degrade inside, MSE, Adam), jitted as
    training jits it (`train.jit_train_step`: state donated) unless `donate=False`.
    """
    import jax
    import numpy as np

    from petsr_jax import sharding, train
    from petsr_jax.models import create_model
    from petsr_jax.task import Bicubic, Task

    config = bench_config(net, remat=remat, scale=scale)
    model = create_model(config)
    tx = train.make_optimizer(config)
    state = train.init_state(config, model, tx)
    step_fn = train.make_train_step(model, tx, Task(Bicubic(scale)))
    if donate:
        mesh = sharding.make_mesh()
        state = sharding.replicate(state, mesh)
        jitted = train.jit_train_step(step_fn, mesh)
    else:
        jitted = jax.jit(step_fn)
    hr = np.random.default_rng(net.seed).random((net.batch, net.size, net.size, 1), np.float32)
    batch_arrays = {"hr": jax.device_put(hr)}
    compiled = jitted.lower(state, batch_arrays).compile()

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        metrics["loss"].block_until_ready()

    times = time_calls(one_step, steps, warmup)
    return _network_result(
        "train",
        net,
        config.model.conv,
        state.params,
        times,
        steps=steps,
        images=net.batch,
        passes=3,
        compiled=compiled,
        remat=remat,
        donate=donate,
        scale=scale,
    )


def _network_result(
    mode: str, net: Network, conv: str, params, times, *, steps, images, passes=1, compiled=None,
    **extra,
):  # fmt: skip
    """A network benchmark's result, the same fields for every mode: the environment, what ran
    (`net`, with `conv` the convolution it resolved to; `extra`: the mode's own settings),
    per-step rates of `images` and of their FLOPs (`passes` forward passes' worth each: 3 for a
    train step, forward and backward), and peak memory, with XLA's fusions and scratch where the
    `compiled` executable is given."""
    import jax

    from petsr_jax.models import count_params

    device = jax.devices()[0]
    result = {
        **_environment(device),
        "model": net.model,
        "blocks": net.blocks if net.model == "deepsr" else None,
        "size": net.size,
        "batch": net.batch,
        "mode": mode,
        "precision": net.precision,
        "conv": conv,
        "steps": steps,
        **extra,
        "params": count_params(params),
    }
    if compiled is not None:
        result["ynn_fusions"] = ynn_fusions_in(compiled.as_text())
    flops = passes * forward_flops_per_pixel(params) * net.size * net.size * images
    _rates(result, times, images, flops, device, PRECISIONS[net.precision])
    result.update(peak_memory(device, compiled))
    return result


def _model_and_params(net: Network, scale: int = 8):
    """(the convolution it resolved to, the network, initialised params) of a benchmark."""
    import jax
    import jax.numpy as jnp

    from petsr_jax.models import create_model

    config = bench_config(net, scale=scale)
    model = create_model(config)
    dummy = jnp.zeros((1, net.size, net.size, config.model.in_channels), jnp.float32)
    params = model.init(jax.random.PRNGKey(net.seed), dummy)["params"]
    return config.model.conv, model, params


def benchmark_infer(net: Network, *, steps: int = 5, warmup: int = 1) -> dict:
    """Forward-pass images/s and GFLOP/s on a resident batch (torch_reference.py's infer)."""
    import jax
    import numpy as np

    conv, model, params = _model_and_params(net)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    x = np.random.default_rng(net.seed).random((net.batch, net.size, net.size, 1), np.float32)
    x = jax.device_put(x)
    compiled = forward.lower(params, x).compile()
    times = time_calls(lambda: compiled(params, x).block_until_ready(), steps, warmup)
    return _network_result(
        "infer", net, conv, params, times, steps=steps, images=net.batch, compiled=compiled
    )


def benchmark_volume(
    net: Network, *, slices: int = 89, steps: int = 1, warmup: int = 1, scale: int = 8
) -> dict:
    """Slices/s of a whole `[slices, size, size]` volume, enhanced as users' scans are.

    Times `evaluation.predict.predict_slices` (degrade, then the network, in batches of
    `net.batch` slices) from host numpy to host numpy. A warm-up runs one batch, not whole
    volumes (a 384² volume takes minutes on a CPU): every batch, the last one included, has the
    same shape.
    """
    import numpy as np

    from petsr_jax import sharding
    from petsr_jax.evaluation import predict
    from petsr_jax.task import Bicubic, Task

    conv, model, params = _model_and_params(net, scale)
    mesh = sharding.make_mesh()

    def run(stack):
        return predict.predict_slices(
            params, stack, model=model, task=Task(Bicubic(scale)), mesh=mesh, batch_size=net.batch
        )

    volume = np.random.default_rng(net.seed).random((slices, net.size, net.size), np.float32)
    for _ in range(warmup):
        run(volume[: min(net.batch, slices)])
    times = time_calls(lambda: run(volume), steps, 0)
    result = _network_result(
        "volume", net, conv, params, times, steps=steps, images=slices, slices=slices
    )
    result["seconds_per_volume"] = result["seconds_per_step"]
    result["slices_per_s"] = result["images_per_s"]
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
