"""The oneDNN convolutions compute the same maths as XLA's, build safely, and fall back cleanly.

Values and all three gradients are checked against the float64 NumPy reference of `conftest`
(written from the definition), the whole train-step gradient of both networks against plain
`jax.grad` through XLA's convolution, and the build against failing compilers and concurrent
builders in fresh processes (the library is built and registered once per process).
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_train_gradients_match_xla,
    fresh_python_env,
    reference_conv_and_grads,
    rel_err,
    run_python,
)

from petsr_jax import benchmark
from petsr_jax.cpu import onednn, resolve_conv
from petsr_jax.models import DeepSR


@pytest.fixture(scope="module", autouse=True)
def _library():
    """Where the build's inputs are installed (x86-64 Linux, g++, the `cpu` extra's oneDNN
    wheels) the library must build and load; elsewhere these tests skip and say why."""
    try:
        onednn.build_inputs()
    except onednn.OneDnnUnavailable as missing:
        pytest.skip(f"oneDNN convolutions cannot be built here: {missing}")
    assert onednn.available(), onednn.unavailable_reason()


# (batch, height, width, in, out, kernel side): every layer shape of both networks, a single
# image, odd sizes, channel counts that are not multiples of oneDNN's 16-wide blocks.
SHAPES = [
    (2, 20, 13, 1, 64, 9),  # SRCNN patch extraction
    (2, 20, 13, 64, 32, 1),  # SRCNN non-linear mapping
    (1, 20, 13, 32, 1, 5),  # SRCNN reconstruction
    (3, 17, 31, 1, 64, 3),  # DeepSR conv_in
    (2, 12, 12, 64, 64, 3),  # DeepSR block convolution
    (3, 17, 31, 64, 1, 3),  # DeepSR conv_out
    (1, 7, 5, 3, 5, 3),
]


@pytest.mark.parametrize("n,h,w,cin,cout,k", SHAPES)
def test_convolution_and_its_gradients_equal_the_float64_reference(n, h, w, cin, cout, k):
    rng = np.random.default_rng(n * 1000 + h * w + cin)
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    kernel = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    g = rng.standard_normal((n, h, w, cout)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(onednn.conv2d_same), x, kernel, bias)
    got = (y, *vjp(jnp.asarray(g)))
    want = reference_conv_and_grads(x, kernel, bias, g)
    for name, a, b in zip(("y", "dx", "dkernel", "dbias"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == jnp.float32, name
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("name,fields", [("deepsr", {"model.num_blocks": 2}), ("srcnn", {})])
def test_train_gradients_equal_plain_jax_grad(name, fields):
    assert_train_gradients_match_xla(name, "onednn", **fields)


def test_the_graph_holds_the_custom_calls_and_no_xla_convolution():
    model = DeepSR(num_blocks=1, width=16, conv=onednn.Conv)
    x = jnp.ones((2, 12, 12, 1))
    params = model.init(jax.random.key(0), x)["params"]
    loss = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)))
    hlo = loss.lower(params).compile().as_text()
    assert hlo.count('custom_call_target="petsr_onednn_conv_forward"') == 4
    assert hlo.count('custom_call_target="petsr_onednn_conv_backward"') == 4
    assert " convolution(" not in hlo


def test_bfloat16_compute_takes_the_xla_path_and_keeps_its_dtype():
    layer = onednn.Conv(4, (3, 3), dtype=jnp.bfloat16)
    x = jnp.ones((1, 8, 8, 2))
    params = layer.init(jax.random.key(0), x)["params"]
    out = jax.jit(layer.apply)({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and params["kernel"].dtype == jnp.float32
    hlo = jax.jit(layer.apply).lower({"params": params}, x).compile().as_text()
    assert "petsr_onednn" not in hlo


def test_auto_picks_onednn_on_one_cpu_device_only():
    assert resolve_conv("auto", backend="cpu", devices=1) == "onednn"
    # Several devices: the custom call has no partitioning rule, XLA would gather the batch.
    assert resolve_conv("auto", backend="cpu", devices=4) == "flax"
    assert resolve_conv("auto", backend="gpu", devices=1) == "flax"
    assert resolve_conv("onednn", backend="cpu", devices=4) == "onednn"


def test_benchmark_reports_the_onednn_path():
    r = benchmark.benchmark_train(
        benchmark.Network("deepsr", 1, 16, 4, conv="onednn"), steps=2, warmup=1
    )
    assert r["conv"] == "onednn" and r["images_per_s"] > 0


# ------------------------------------------------------------------- builds in fresh processes


PROBE = """
    from petsr_jax import cpu; cpu.configure()
    from petsr_jax.cpu import onednn, resolve_conv
    print(onednn.available(), resolve_conv("auto"), "|", onednn.unavailable_reason())
"""


def test_a_failing_compiler_means_fallback_with_the_reason(tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    out = run_python(PROBE, CXX=str(compiler), PETSR_CACHE_DIR=str(cache))
    assert out.returncode == 0, out.stderr
    available, conv, _, reason = out.stdout.split(maxsplit=3)
    assert (available, conv) == ("False", "cpu")
    assert "compiling onednn_conv.cc failed" in reason and "this compiler is broken" in reason
    assert not list((cache / "native").glob("*")), "a failed build left files behind"


def test_turning_the_path_off_falls_back():
    out = run_python(PROBE, PETSR_ONEDNN="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["False", "cpu"] and "PETSR_ONEDNN" in out.stdout


def test_concurrent_first_builds_each_load_one_complete_library(tmp_path):
    """Multi-host runs start several processes on one machine at once, all with a cold cache;
    two started together race to build it as any number would."""
    env = fresh_python_env(PETSR_CACHE_DIR=str(tmp_path))
    code = textwrap.dedent(PROBE)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(o.split()[:2] == ["True", "onednn"] for o in outs), outs
    libraries = list((tmp_path / "native").iterdir())
    assert len(libraries) == 1 and libraries[0].suffix == ".so"
