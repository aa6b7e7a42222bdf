"""The benchmark counts FLOPs from the layer list, reports torch_reference.py's keys and rates
consistent with its own timings, and its script prints one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from petsr_jax import benchmark
from petsr_jax.models import SRCNN, DeepSR

REPO = Path(__file__).resolve().parents[1]


def test_forward_flops_follow_the_paper_layer_list():
    x = jnp.zeros((1, 16, 16, 1))
    srcnn = jax.eval_shape(SRCNN().init, jax.random.key(0), x)["params"]
    # 9×9 1→64, 1×1 64→32, 5×5 32→1; 2 FLOPs per multiply-add.
    assert benchmark.forward_flops_per_pixel(srcnn) == 2 * (81 * 64 + 64 * 32 + 25 * 32)
    deepsr = jax.eval_shape(DeepSR(num_blocks=3, width=8).init, jax.random.key(0), x)["params"]
    assert benchmark.forward_flops_per_pixel(deepsr) == 2 * 9 * (8 + 2 * 3 * 8 * 8 + 8)


class _FakeDevice:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


def test_peak_flops_known_gpus_and_none_on_cpu():
    assert benchmark.peak_flops(_FakeDevice("cpu", "cpu"), "float32") is None
    assert benchmark.peak_flops(_FakeDevice("gpu", "NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
    assert benchmark.peak_flops(_FakeDevice("gpu", "NVIDIA H100 PCIe"), "bfloat16") == 756e12
    assert benchmark.peak_flops(_FakeDevice("gpu", "NVIDIA A100-SXM4-40GB"), "float32") == 156e12
    assert benchmark.peak_flops(_FakeDevice("gpu", "Some Future GPU"), "bfloat16") is None


TORCH_KEYS = {"model", "blocks", "size", "batch", "mode", "seconds_per_step", "images_per_s"}


def test_train_benchmark_reports_torch_reference_keys_and_consistent_rates():
    r = benchmark.benchmark_train(
        benchmark.Network("deepsr", 1, 16, 4, conv="cpu"), steps=2, warmup=1
    )
    assert TORCH_KEYS | {"gflops_per_s", "params", "peak_memory_bytes"} <= set(r)
    assert r["images_per_s"] == pytest.approx(4 / r["seconds_per_step"])
    flops = 3 * 2 * 9 * (64 + 2 * 64 * 64 + 64) * 16 * 16 * 4
    assert r["gflops_per_s"] == pytest.approx(flops / r["seconds_per_step"] / 1e9)
    assert r["mfu"] is None and r["conv"] == "cpu"


def test_volume_benchmark_times_every_slice_of_the_volume():
    r = benchmark.benchmark_volume(benchmark.Network("srcnn", size=16, batch=2), slices=5, warmup=1)
    assert r["slices"] == 5 and r["conv"] == "flax"  # several devices here: flax's convolution
    assert r["slices_per_s"] == pytest.approx(5 / r["seconds_per_volume"])


def test_loader_benchmark_counts_slices():
    r = benchmark.benchmark_loader(32, 4, crop=16, num_slices=12, steps=3, warmup=1)
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
