"""The fast CPU convolution computes the same maths; the benchmark counts and reports honestly.

The convolution and its three gradients are checked against a float64 NumPy implementation
written from the definition (sliding windows), and the whole train-step gradient of both
networks against plain `jax.grad` through XLA's convolution. The XLA flag is checked where it
acts: in a fresh process, the compiled HLO holds no YNN fusion.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_train_gradients_match_xla,
    reference_conv_and_grads,
    rel_err,
    run_python,
)

from petsr_jax import fast_conv, perf
from petsr_jax.models import SRCNN, DeepSR, count_params, resolve_conv

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "shape,ksize,cout",
    [
        ((2, 11, 13, 3), 3, 5),
        ((1, 9, 7, 4), 9, 6),
        ((3, 6, 5, 8), 1, 4),
        ((2, 8, 8, 6), 5, 1),
        ((8, 5, 6, 2), 3, 3),  # a batch large enough for the kernel gradient without strips
    ],
)
def test_conv2d_same_and_its_gradients_equal_a_float64_reference(shape, ksize, cout):
    rng = np.random.default_rng(sum(shape) + ksize)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((ksize, ksize, shape[-1], cout)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (cout,)).astype(np.float32)

    y, vjp = jax.vjp(fast_conv.conv2d_same, x, kernel, bias)
    dx, dkernel, dbias = vjp(jnp.asarray(g))
    ref = reference_conv_and_grads(x, kernel, bias, g)
    for name, got, want in zip(
        ("y", "dx", "dkernel", "dbias"), (y, dx, dkernel, dbias), ref, strict=True
    ):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("shape,ksize", [((1, 13, 6, 3), 3), ((2, 10, 7, 2), 5), ((3, 9, 4, 2), 1)])
def test_kernel_gradient_in_row_strips_equals_the_float64_reference(shape, ksize):
    """Small batches take the strip path; heights that do not divide evenly are padded."""
    rng = np.random.default_rng(ksize)
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (4,)).astype(np.float32)
    kernel_shape = (ksize, ksize, shape[-1], 4)
    got = fast_conv.kernel_gradient(jnp.asarray(x), jnp.asarray(g), kernel_shape)
    zeros = np.zeros(kernel_shape, np.float32)
    want = reference_conv_and_grads(x, zeros, np.zeros(4, np.float32), g)[2]
    assert rel_err(got, want) < 1e-5


def test_bias_gradient_handles_pixel_counts_not_divisible_by_the_group():
    g = np.random.default_rng(0).standard_normal((1, 7, 5, 3)).astype(np.float32)  # 35 pixels
    np.testing.assert_allclose(
        fast_conv.bias_gradient(jnp.asarray(g)), g.astype(np.float64).sum((0, 1, 2)), rtol=1e-5
    )


# -------------------------------------------------------------------- whole-network equivalence


@pytest.mark.parametrize("name,fields", [("deepsr", {"model.num_blocks": 2}), ("srcnn", {})])
def test_cpu_conv_train_gradients_equal_plain_jax_grad(name, fields):
    assert_train_gradients_match_xla(name, "cpu", **fields)


def test_cpu_conv_keeps_the_parameter_tree_and_initial_values():
    x = jnp.zeros((1, 8, 8, 1))
    for make in (SRCNN, functools.partial(DeepSR, num_blocks=2)):
        a = make(conv="xla").init(jax.random.key(0), x)["params"]
        b = make(conv="cpu").init(jax.random.key(0), x)["params"]
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(u, v)
    for make, n_params in ((SRCNN, 8129), (DeepSR, 1478337)):
        shapes = jax.eval_shape(make(conv="cpu").init, jax.random.key(0), x)["params"]
        assert count_params(shapes) == n_params


def test_conv_choice_follows_the_backend():
    assert resolve_conv("auto", backend="cpu", devices=4) == "cpu"
    assert resolve_conv("auto", backend="gpu") == "xla"
    assert resolve_conv("xla", backend="cpu") == "xla"
    with pytest.raises(ValueError, match="model.conv"):
        resolve_conv("fast")


def test_cpu_conv_computes_in_the_requested_dtype():
    layer = fast_conv.Conv(4, (3, 3), dtype=jnp.bfloat16)
    x = jnp.ones((1, 8, 8, 2))
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].dtype == jnp.float32
    assert layer.apply({"params": params}, x).dtype == jnp.bfloat16


# --------------------------------------------------------------------------- the XLA CPU flag


def test_configure_cpu_leaves_a_users_choice_and_accelerators_alone(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(perf, "_jaxlib_version", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    assert perf.configure_cpu(env) == perf.CPU_XLA_FLAGS[(0, 10)]
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        perf.CPU_XLA_FLAGS[(0, 10)],
    ]
    chosen = {"XLA_FLAGS": f"{perf.YNN_FUSION_FLAG}=individual_dot", "JAX_PLATFORMS": "cpu"}
    assert perf.configure_cpu(chosen) is None
    assert chosen["XLA_FLAGS"] == f"{perf.YNN_FUSION_FLAG}=individual_dot"
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert perf.configure_cpu(gpu) is None and "XLA_FLAGS" not in gpu
    monkeypatch.setattr(perf, "_jaxlib_version", lambda: (0, 4))  # a version never measured
    assert perf.configure_cpu({"JAX_PLATFORMS": "cpu"}) is None


def test_configure_cpu_is_refused_once_jax_has_started():
    jax.devices()  # this process's backend is up
    env = {"JAX_PLATFORMS": "cpu"}
    assert perf.configure_cpu(env) is None and "XLA_FLAGS" not in env


@pytest.mark.skipif(
    perf._jaxlib_version() not in perf.CPU_XLA_FLAGS, reason="no XLA CPU flags for this jaxlib"
)
def test_configured_process_compiles_convolutions_without_ynn_fusions():
    code = (
        "from petsr_jax import perf; perf.configure_cpu()\n"
        "import jax, jax.numpy as jnp\n"
        "from petsr_jax.fast_conv import conv2d_same\n"
        "x, k, b = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones(4)\n"
        "f = jax.jit(jax.grad(lambda k: conv2d_same(x, k, b).sum()))\n"
        "print(perf.ynn_fusions_in(f.lower(k).compile().as_text()))\n"
    )
    out = run_python(code, JAX_PLATFORMS="cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------------- counting and peaks


def test_forward_flops_follow_the_paper_layer_list():
    x = jnp.zeros((1, 16, 16, 1))
    srcnn = jax.eval_shape(SRCNN().init, jax.random.key(0), x)["params"]
    # 9×9 1→64, 1×1 64→32, 5×5 32→1; 2 FLOPs per multiply-add.
    assert perf.forward_flops_per_pixel(srcnn) == 2 * (81 * 64 + 64 * 32 + 25 * 32)
    deepsr = jax.eval_shape(DeepSR(num_blocks=3, width=8).init, jax.random.key(0), x)["params"]
    assert perf.forward_flops_per_pixel(deepsr) == 2 * 9 * (8 + 2 * 3 * 8 * 8 + 8)


class _FakeDevice:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


def test_peak_flops_known_gpus_and_none_on_cpu():
    assert perf.peak_flops(_FakeDevice("cpu", "cpu"), "float32") is None
    assert perf.peak_flops(_FakeDevice("gpu", "NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
    assert perf.peak_flops(_FakeDevice("gpu", "NVIDIA H100 PCIe"), "bfloat16") == 756e12
    assert perf.peak_flops(_FakeDevice("gpu", "NVIDIA A100-SXM4-40GB"), "float32") == 156e12
    assert perf.peak_flops(_FakeDevice("gpu", "Some Future GPU"), "bfloat16") is None


# ---------------------------------------------------------------------------------- inference


def test_batched_forward_equals_one_big_batch_for_any_slice_count():
    model = DeepSR(num_blocks=1, width=4)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))["params"]
    volume = np.random.default_rng(0).random((7, 12, 12), np.float32)

    def apply(p, x):
        return model.apply({"params": p}, x)

    run = perf.make_batched_forward(apply, params, batch_size=3)  # batches of 3, 3 and 1
    want = np.asarray(jax.jit(apply)(params, volume[..., None]))[..., 0]
    np.testing.assert_allclose(run(volume), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- benchmarks

TORCH_KEYS = {"model", "blocks", "size", "batch", "mode", "seconds_per_step", "images_per_s"}


def test_train_benchmark_reports_torch_reference_keys_and_consistent_rates():
    r = perf.benchmark_train("deepsr", 1, 16, 4, steps=2, warmup=1, conv="cpu")
    assert TORCH_KEYS | {"gflops_per_s", "params", "peak_memory_bytes"} <= set(r)
    assert r["images_per_s"] == pytest.approx(4 / r["seconds_per_step"])
    flops = 3 * 2 * 9 * (64 + 2 * 64 * 64 + 64) * 16 * 16 * 4
    assert r["gflops_per_s"] == pytest.approx(flops / r["seconds_per_step"] / 1e9)
    assert r["mfu"] is None and r["conv"] == "cpu"


def test_loader_benchmark_counts_slices():
    r = perf.benchmark_loader(32, 4, crop=16, num_slices=12, steps=3, warmup=1)
    assert r["slices_per_s"] == pytest.approx(3 * 4 / (3 * r["seconds_per_step"]))
    assert r["megabytes_per_s"] == pytest.approx(r["slices_per_s"] * 16 * 16 * 4 / 1e6)


def test_benchmark_script_prints_one_json_line():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(REPO / "launch" / "benchmark.py"), "--model=srcnn", "--size=16",
         "--batch=2", "--mode=infer", "--steps=1", "--warmup=0", "--json"],
        env=env, capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mode"] == "infer" and result["images_per_s"] > 0
    assert result["params"] == 8129


# ------------------------------------------------------------------------------- the allocator

needs_tcmalloc = pytest.mark.skipif(
    perf.find_tcmalloc() is None,
    reason="tcmalloc not installed (apt-get install libtcmalloc-minimal4)",
)

RELAUNCH_PROBE = """
import os, sys
print("start", os.getpid(), flush=True)
from petsr_jax import perf
perf.configure_cpu(relaunch=True)
print("running", os.getpid(), perf.tcmalloc_loaded(), sys.argv[1:], flush=True)
"""


@needs_tcmalloc
def test_launch_scripts_reexecute_once_onto_tcmalloc_with_the_same_arguments():
    out = run_python(RELAUNCH_PROBE, "--config=x", "two words")
    assert out.returncode == 0, out.stderr
    lines = [line.split(maxsplit=2) for line in out.stdout.splitlines()]
    assert [line[0] for line in lines] == ["start", "start", "running"]  # one re-execution
    assert lines[0][1] == lines[1][1] == lines[2][1]  # the same process, as schedulers see it
    assert lines[2][2] == "True ['--config=x', 'two words']"


def test_the_system_allocator_can_be_kept_and_a_typo_is_an_error():
    out = run_python(RELAUNCH_PROBE, PETSR_ALLOCATOR="system")
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["start", "running"]
    assert out.stdout.splitlines()[-1].endswith("False []")
    typo = run_python(RELAUNCH_PROBE, PETSR_ALLOCATOR="tcmaloc")
    assert typo.returncode != 0 and "PETSR_ALLOCATOR must be" in typo.stderr


def test_use_tcmalloc_prepends_the_library_and_never_loops(monkeypatch, tmp_path):
    library = tmp_path / perf.TCMALLOC_LIBRARIES[0]
    library.write_bytes(b"")
    assert perf.find_tcmalloc([str(tmp_path / "missing"), str(tmp_path)]) == str(library)
    monkeypatch.setattr(perf, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(perf, "find_tcmalloc", lambda: str(library))
    monkeypatch.setattr(perf, "_can_reexecute", lambda: True)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "launch/main.py", "--flag"])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.delenv("PETSR_ALLOCATOR", raising=False)
    calls = []
    assert not perf.use_tcmalloc(execve=lambda *a: calls.append(a))
    ((path, argv, env),) = calls
    assert path == sys.executable and argv == [sys.executable, "-u", "launch/main.py", "--flag"]
    assert env["LD_PRELOAD"] == f"{library} libother.so"
    # The preload was tried but did not take: stay, rather than re-executing forever.
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])
    assert not perf.use_tcmalloc(execve=lambda *a: calls.append(a)) and len(calls) == 1
    # Accelerator runs keep their allocator.
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not perf.use_tcmalloc(execve=lambda *a: calls.append(a)) and len(calls) == 1


def test_notebooks_and_worker_processes_are_never_reexecuted(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "launch/main.py"])
    monkeypatch.setattr(sys, "argv", ["launch/main.py"])
    assert perf._can_reexecute()
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a data-loader worker
        assert pool.apply(perf._can_reexecute) is False
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # an interactive session
    assert not perf._can_reexecute()


@functools.cache
def _faults_of_second_allocation(allocator: str) -> int:
    """Page faults of allocating, touching and freeing 256 MiB, the second of two times, from a
    worker thread — the way XLA:CPU allocates a step's temporaries."""
    code = """
import ctypes, resource, threading
from petsr_jax import perf
perf.configure_cpu(relaunch=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size, faults = 256 << 20, []
def touch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(ctypes.c_void_p(p))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(2):
    t = threading.Thread(target=touch); t.start(); t.join()
print(perf.tcmalloc_loaded(), faults[1])
"""
    out = run_python(code, PETSR_ALLOCATOR=allocator)
    assert out.returncode == 0, out.stderr
    loaded, faults = out.stdout.split()[-2:]
    assert loaded == str(allocator == "tcmalloc")
    return int(faults)


@needs_tcmalloc
def test_on_tcmalloc_a_large_block_is_reused_without_page_faults():
    """Why the launch scripts move onto tcmalloc: glibc maps such a block afresh every time."""
    pages = (256 << 20) // 4096
    assert _faults_of_second_allocation("system") > pages // 2
    assert _faults_of_second_allocation("tcmalloc") < pages // 50
