"""Throughput of the train step, inference, whole-volume inference and the data loader.

Examples, one per use:

  python launch/benchmark.py --model=deepsr --size=96 --batch=4 --mode=train
  python launch/benchmark.py --model=deepsr --size=384 --batch=1 --mode=infer --json
  python launch/benchmark.py --mode=volume --size=384 --batch=4 --slices=89
  python launch/benchmark.py --mode=loader --size=384 --batch=16 --crop=96 --workers=2
  python launch/benchmark.py --mode=train --precision=bf16 --remat     # on a GPU

Flags and JSON keys match `../shared/bench/torch_reference.py`, so the two run side by side.

FLOPs count 2 per multiply-add of every forward convolution, 3× that for a train step. MFU is
reported against the device's dense peak where it is known (GPUs), "n/a" on CPUs.
"""

from petsr_jax import cpu

cpu.configure(relaunch=True)  # first: tcmalloc and XLA CPU flags for training (no-op on GPUs)

import json  # noqa: E402

from absl import app, flags  # noqa: E402

from petsr_jax import benchmark, cli  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "deepsr", ["srcnn", "deepsr"], "Network.")
_BLOCKS = flags.DEFINE_integer("blocks", 20, "DeepSR residual blocks.")
_SIZE = flags.DEFINE_integer("size", 96, "Image side in pixels (slices for volume/loader).")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per step (slices per batch for volume).")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "infer", "volume", "loader"],
    "train: train step; infer: forward pass; volume: a whole volume in slice batches, host to "
    "host; loader: the Grain training loader's slices/s.",
)
_VOLUME = flags.DEFINE_bool("volume", False, "Shorthand for --mode=volume.")
_PRECISION = flags.DEFINE_enum(
    "precision", "fp32", sorted(benchmark.PRECISIONS), "Compute dtype; params stay float32."
)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median reported); volumes for volume.")
flags.DEFINE_alias("iters", "steps")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed steps after compilation (volume mode: untimed batches, not volumes)."
)
_REMAT = flags.DEFINE_bool("remat", False, "Recompute DeepSR block activations in backward.")
_DONATE = flags.DEFINE_bool("donate", True, "Donate the train state to the step.")
_SCALE = flags.DEFINE_integer("scale", 8, "Downscaling factor of the degraded input.")
_SLICES = flags.DEFINE_integer("slices", 89, "Slices of the volume (volume mode).")
_CROP = flags.DEFINE_integer("crop", 0, "Random crop side, 0 = whole slices (loader mode).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Grain worker processes (loader mode).")
_CONV = flags.DEFINE_enum(
    "conv",
    "auto",
    ["auto", "flax", "cpu", "onednn"],
    "Convolution module (auto: flax's on GPUs; on one CPU device onednn where it builds, else "
    "cpu, petsr_jax.cpu.fast_conv).",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line instead of text.")


def run() -> dict:
    mode = "volume" if _VOLUME.value else _MODE.value
    common = dict(steps=_STEPS.value, warmup=_WARMUP.value)
    if mode == "loader":
        return benchmark.benchmark_loader(
            _SIZE.value, _BATCH.value, crop=_CROP.value, workers=_WORKERS.value, **common
        )
    net = benchmark.Network(
        model=_MODEL.value,
        blocks=_BLOCKS.value,
        size=_SIZE.value,
        batch=_BATCH.value,
        precision=_PRECISION.value,
        conv=_CONV.value,
    )
    if mode == "train":
        return benchmark.benchmark_train(
            net, remat=_REMAT.value, donate=_DONATE.value, scale=_SCALE.value, **common
        )
    if mode == "infer":
        return benchmark.benchmark_infer(net, **common)
    return benchmark.benchmark_volume(net, slices=_SLICES.value, scale=_SCALE.value, **common)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    result = run()
    print(json.dumps(result) if _JSON.value else benchmark.format_result(result))


if __name__ == "__main__":
    cli.run(
        main,
        usage="[--model=deepsr|srcnn] [--mode=train|infer|volume|loader] [--size=N] [--batch=N]",
        example="python launch/benchmark.py --model=deepsr --size=96 --batch=4 --mode=train",
    )
