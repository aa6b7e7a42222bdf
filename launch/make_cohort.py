"""Write the embedded synthetic FDG-PET cohort to disk and a montage PNG to look at.

Examples, one per use:

  python launch/make_cohort.py --preset=paper     # 33 patients × 89 slices of 384² (the paper's)
  python launch/make_cohort.py --preset=small     # 12 × 40 slices of 128², what `quick` trains on
  python launch/make_cohort.py --preset=small --root=/data/cohort-small --montage=small.png

Training generates the cohort on first use anyway; this entry point does it ahead of time, with
a progress bar, and shows what was made. An existing finished root is reused, not rewritten.
"""

import time
from pathlib import Path

from absl import flags

from petsr_jax import cli, sim

_PRESET = flags.DEFINE_enum("preset", "paper", sorted(sim.PRESETS), "Cohort size preset.")
_ROOT = flags.DEFINE_string(
    "root",
    None,
    "Data root (default: $PETSR_DATA_DIR or ~/.cache/petsr_jax, per preset, seed and version).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Cohort seed: same seed, same cohort.")
_MONTAGE = flags.DEFINE_string("montage", None, "PNG path (default: <root>/montage.png).")
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes (default: available CPUs).")


def _disk_usage(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def main(argv):
    del argv
    spec = sim.PRESETS[_PRESET.value]
    root = Path(_ROOT.value) if _ROOT.value else sim.default_root(_PRESET.value, _SEED.value)
    existed = (root / "cohort.json").is_file()
    start = time.perf_counter()
    root = sim.ensure_cohort(_PRESET.value, root=root, seed=_SEED.value, workers=_WORKERS.value)
    seconds = time.perf_counter() - start
    montage = sim.save_montage(root, _MONTAGE.value)
    print(f"cohort: {root}")
    print(
        f"size: {spec.n_patients} patients × {spec.n_slices} slices × {spec.size}², "
        f"voxels (z, y, x) {tuple(round(s, 3) for s in spec.spacing)} mm, "
        f"{_disk_usage(root) / 2**20:.0f} MiB on disk"
    )
    print(
        f"reused the existing cohort ({seconds:.1f} s)"
        if existed
        else f"generated in {seconds:.1f} s"
    )
    print(f"montage: {montage}")


if __name__ == "__main__":
    cli.run(
        main,
        usage="[--preset=paper|small|tiny] [--root=<folder>] [--montage=<png>]",
        example="python launch/make_cohort.py --preset=small",
    )
