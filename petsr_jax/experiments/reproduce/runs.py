"""Which runs the reproduction needs, training or reusing them, and whether they can share a table.

Two models at every scale (`MODELS`), and beside them the `VARIANTS`: DeepSR with the paper
text's image-level skip at 8×, and the MR-guided DeepSR at every scale. Every run is of the
paper's domain and protocol (the `paper` config flag), in a workdir named by the protocol
(`run_name`), so a quick run never answers for a full one; `train.train_and_evaluate` reuses a
finished run and resumes an interrupted one. The bicubic row of a table is measured by every
run of its scale, so `check_bicubic_agrees` stops the report when two of them did not see the
same test data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shlex
import time
from pathlib import Path

import numpy as np

from petsr_jax import train
from petsr_jax.config import FLAGS, MODELS, build_config, validate
from petsr_jax.run import identity, layout

log = logging.getLogger(__name__)


PAPER_SCALES = (8, 12, 16)

# The runs beside the two models: name → (model, config overrides, scales it runs at). The paper's
# text describes an input→output skip; the authors' code (and the default) skips at feature level.
# MR-guided DeepSR (the paper's future work: the co-registered T1 as a second input channel)
# runs at every paper scale, beside the PET-only DeepSR of the same protocol.
VARIANTS = {
    "deepsr_image": ("deepsr", "model.global_skip=image", (8,)),
    "deepsr_mr": ("deepsr", "mr", PAPER_SCALES),
}

# Relative tolerance for "the two bicubic measurements agree". A different test set or
# degradation moves PSNR by tenths of a dB; float reassociation between two compilations by
# ~1e-7. The tables print 0.01 dB.
BICUBIC_RTOL = 1e-5


class ReproduceError(RuntimeError):
    """The runs cannot make the paper's tables; the message names the workdir and the field."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `reproduce` runs and where it writes.

    Attributes:
      scales: downscaling factors, one table and one figure each (the paper: 8, 12, 16).
      quick: each config's `quick` flag (small cohort, short training: a 2-core CPU in ~1 h).
      config_arg: further config arg for both models, e.g. `"tiny,train.epochs=2"`; it may not
        set `scale` (that is `scales`).
      runs_dir: parent of the six workdirs.
      out_dir: where tables, figures and report.md go.
    """

    scales: tuple[int, ...] = PAPER_SCALES
    quick: bool = False
    config_arg: str = ""
    runs_dir: Path = Path("runs")
    out_dir: Path = Path("reports/paper")

    def protocol_tokens(self) -> list[str]:
        """What every run's config arg starts with: `paper`, `quick` when asked, the user's arg."""
        return ["paper"] + (["quick"] if self.quick else []) + _tokens(self.config_arg)

    def model_arg(self, scale: int, variant: str | None = None) -> str:
        """The config arg of one run: the protocol's tokens, the variant's overrides, then the
        scale."""
        tokens = self.protocol_tokens()
        if variant in VARIANTS:
            tokens += _tokens(VARIANTS[variant][1])
        return ",".join(tokens + [f"scale={scale}"])

    def command(self) -> str:
        """The `launch/reproduce.py` command line that runs these settings."""
        parts = ["python", "launch/reproduce.py"]
        if self.quick:
            parts.append("--quick")
        parts += [
            f"--scales={','.join(str(s) for s in self.scales)}",
            f"--runs={self.runs_dir}",
            f"--out={self.out_dir}",
        ]
        if self.config_arg:
            parts.append(f"--config_arg={self.config_arg}")
        return shlex.join(parts)


def _tokens(arg: str) -> list[str]:
    return [t.strip() for t in (arg or "").split(",") if t.strip()]


def run_name(model: str, scale: int, settings: Settings) -> str:
    """`<model>_x<scale>`, then the config flags, then a hash of any `key=value` overrides.

    The name separates protocols (full, quick, tiny, other overrides), so `reproduce` with one
    protocol never reuses a run of another; the hash keeps names short when overrides name long
    paths, and is stable across processes (unlike `hash()`).
    """
    tokens = settings.protocol_tokens()
    flags = sorted({t for t in tokens if "=" not in t})
    overrides = sorted(t for t in tokens if "=" in t)
    name = f"{model}_x{scale}" + "".join(f"_{f}" for f in flags)
    if overrides:
        name += "_" + hashlib.sha1(",".join(overrides).encode()).hexdigest()[:8]
    return name


def build_configs(settings: Settings) -> dict[tuple[str, int], object]:
    """(model, scale) → validated, locked config; every problem reported before any training."""
    if not settings.scales:
        raise ReproduceError("scales: expected at least one downscaling factor, e.g. 8,12,16")
    if len(set(settings.scales)) != len(settings.scales):
        raise ReproduceError(f"scales: {settings.scales} names a scale twice")
    for token in _tokens(settings.config_arg):
        key = token.split("=", 1)[0].strip()
        if "=" in token and key == "scale":
            raise ReproduceError(
                f"config_arg {settings.config_arg!r} sets scale; give the scales with --scales"
            )
        if "=" not in token and token not in FLAGS:
            raise ReproduceError(
                f"config_arg {settings.config_arg!r}: unknown flag {token!r}; flags: "
                f"{', '.join(sorted(FLAGS))}"
            )
    configs = {}
    for scale in settings.scales:
        names = list(MODELS) + [v for v, (_, _, scales) in VARIANTS.items() if scale in scales]
        for name in names:
            try:
                config = build_config(model_of(name), settings.model_arg(scale, name))
                validate(config)
            except (KeyError, ValueError) as e:
                raise ReproduceError(f"{name} at {scale}×: {e}") from e
            configs[(name, scale)] = config
    return configs


def model_of(name: str) -> str:
    """The model a run name trains ("deepsr_image" → "deepsr")."""
    return VARIANTS[name][0] if name in VARIANTS else name


@dataclasses.dataclass
class RunRecord:
    """One run as `reproduce` found and left it."""

    model: str
    scale: int
    workdir: Path
    status: str  # "reused" (finished before), "trained" (from scratch) or "resumed"
    wall_s: float  # seconds spent in train_and_evaluate by this call
    results: dict

    def main_command(self, settings: Settings) -> str:
        """The `launch/main.py` command that trains this run alone."""
        return shlex.join(
            [
                "python",
                "launch/main.py",
                f"--config=configs/{model_of(self.model)}.py:"
                f"{settings.model_arg(self.scale, self.model)}",
                f"--workdir={self.workdir}",
            ]
        )


def run_all(settings: Settings, configs: dict, *, progress: bool = True) -> dict:
    """(model, scale) → `RunRecord`: train what is missing, resume what was cut, reuse the rest."""
    workdirs = {
        key: (Path(settings.runs_dir) / run_name(*key, settings)).absolute() for key in configs
    }
    # Every workdir is checked before the first run starts, so a refusal costs no training.
    for key, config in configs.items():
        try:
            identity.check_same_run(
                workdirs[key], config, remedy="Give another --runs folder for these settings"
            )
        except layout.WorkdirError as error:
            raise ReproduceError(str(error)) from None
    records = {}
    for (model, scale), config in configs.items():
        workdir = workdirs[(model, scale)]
        results_path = workdir / layout.RESULTS
        before = results_path.stat().st_mtime_ns if results_path.exists() else None
        checkpoints = workdir / layout.CHECKPOINTS
        resumable = checkpoints.is_dir() and any(checkpoints.iterdir())
        t0 = time.perf_counter()
        results = train.train_and_evaluate(config, workdir, progress=progress)
        wall = time.perf_counter() - t0
        after = results_path.stat().st_mtime_ns if results_path.exists() else None
        if before is not None and before == after:
            status = "reused"
        else:
            status = "resumed" if resumable else "trained"
        log.info("%s %d×: %s in %.1f s (%s)", model, scale, status, wall, workdir)
        records[(model, scale)] = RunRecord(model, scale, workdir, status, wall, results)
    return records


def read_record(workdir: Path, name: str) -> dict:
    """A record of a finished run (`layout.read_record`); one that is absent is an error here."""
    try:
        record = layout.read_record(workdir, name)
    except layout.WorkdirError as e:
        raise ReproduceError(f"cannot read {e}") from None
    if record is None:
        raise ReproduceError(f"cannot read {Path(workdir) / name}: no such file")
    return record


def check_bicubic_agrees(srcnn: RunRecord, deepsr: RunRecord) -> None:
    """The two runs of a scale measured the same bicubic baseline, slice by slice.

    Compares the test slices (patient, slice index) and every per-slice bicubic score of
    `test_scores.json`, then the summary of `results.json`; raises `ReproduceError` naming both
    workdirs and the first disagreement.
    """
    where = f"{srcnn.workdir} and {deepsr.workdir}"
    split_a, split_b = (read_record(r.workdir, layout.SPLIT) for r in (srcnn, deepsr))
    if split_a.get("test") != split_b.get("test"):
        raise ReproduceError(
            f"{where} have different test patients ({split_a.get('test')} vs "
            f"{split_b.get('test')}); the tables need both models on the same test split"
        )
    scores_a, scores_b = (read_record(r.workdir, layout.TEST_SCORES) for r in (srcnn, deepsr))
    for key in ("patient", "slice_index"):
        if scores_a.get(key) != scores_b.get(key):
            raise ReproduceError(f"{where}: the test slices differ ({key} lists disagree)")
    keys = sorted(k for k in set(scores_a) | set(scores_b) if k.startswith("bicubic/"))
    for key in keys:
        if key not in scores_a or key not in scores_b:
            continue  # LPIPS computed by one run only: nothing to compare
        a, b = np.asarray(scores_a[key], float), np.asarray(scores_b[key], float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=BICUBIC_RTOL, atol=0):
            worst = int(np.argmax(np.abs(a - b))) if a.shape == b.shape else 0
            raise ReproduceError(
                f"bicubic {key.split('/')[1]} differs between {where} (slice {worst}: "
                f"{a.flat[worst]!r} vs {b.flat[worst]!r}); both runs must degrade the same "
                "test slices with the same degrade(). Retrain one of them in a fresh workdir."
            )
    summary_a, summary_b = srcnn.results["test"]["bicubic"], deepsr.results["test"]["bicubic"]
    for metric in sorted(set(summary_a) & set(summary_b)):
        if not np.isclose(summary_a[metric], summary_b[metric], rtol=BICUBIC_RTOL, atol=0):
            raise ReproduceError(
                f"bicubic {metric} in results.json differs between {where}: "
                f"{summary_a[metric]!r} vs {summary_b[metric]!r}"
            )


def check_baselines(records: dict) -> None:
    """Every run of a scale measured the bicubic baseline its SRCNN run did (`records`:
    (name, scale) → `RunRecord`); checked for every scale before anything is written."""
    for (name, scale), record in records.items():
        if name != "srcnn":
            check_bicubic_agrees(records[("srcnn", scale)], record)


def load_models(records: dict) -> dict:
    """(model, scale) → the run's `SuperResolver` (the params it scored, its own config)."""
    from petsr_jax import inference

    return {key: inference.load(record.workdir) for key, record in records.items()}
