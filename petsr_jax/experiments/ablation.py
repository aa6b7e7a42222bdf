"""Ablations: one training run per value of one config field, and a table and plots over them.

A sweep names a config field — `depth` (`model.num_blocks`), `lr` (`train.lr`), or any dotted
field such as `model.width` — and the values to try, given as text and typed like the field.
Each value gets its own workdir `<runs>/<model>_x<scale>[_<cohort>]_<sweep><value>` (e.g.
`runs/ablation/deepsr_x8_depth10`) and is trained by `train.train_and_evaluate`, so a rerun skips
finished runs and resumes interrupted ones from their last checkpoint.

The table compares the runs on the validation and test splits. Test metrics come from each run's
results.json; validation metrics of the same (best-validation) params are computed here, once,
and kept in the run's `val_results.json`, so the training code stays unchanged and a rerun does
not evaluate again. Outputs, each written through a temporary file and a rename, in `<out>`
(default `<runs>/<model>_x<scale>[_<cohort>]_<sweep>_sweep`):

    <out>/ablation.md            the table for people (mean ± std over slices)
    <out>/ablation.json          the same numbers for programs
    <out>/metrics_vs_<sweep>.png PSNR / SSIM (/ LPIPS) against the swept value, bicubic as a line
    <out>/training_curves.png    train loss and validation PSNR against step, one line per run

    table = run_sweep(build_config("deepsr", "scale=8,quick"), "depth", ["2", "6"], "runs/abl")
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from petsr_jax import data, sharding, train
from petsr_jax.config import field_names, parse_value, validate
from petsr_jax.data import mr
from petsr_jax.evaluation import evaluate, report
from petsr_jax.io import files
from petsr_jax.models import abstract_params, create_model
from petsr_jax.run import checkpoint, identity, layout
from petsr_jax.run.lock import WorkdirLock
from petsr_jax.task import Task

log = logging.getLogger(__name__)

# Short sweep names for the two ablations of the paper's discussion.
SWEEP_ALIASES = {"depth": "model.num_blocks", "lr": "train.lr"}

# Metrics shown in the table and plots: (key, label, digits, higher is better).
TABLE_METRICS = (
    ("psnr", "PSNR (dB)", 2, True),
    ("ssim", "SSIM", 3, True),
    ("lpips", "LPIPS", 3, False),
)
SPLITS = ("val", "test")
MODEL_NAMES = {"srcnn": "multi-scale SRCNN", "deepsr": "DeepSR"}


class AblationError(ValueError):
    """A sweep that cannot run; the message names the field, value or workdir at fault."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What is swept: the dotted config field, its short name, and the typed values."""

    field: str
    label: str
    values: tuple[Any, ...]

    @property
    def log_scale(self) -> bool:
        """Plot on a log axis: positive floats spanning at least a decade (learning rates)."""
        floats = [v for v in self.values if isinstance(v, float) and not isinstance(v, bool)]
        return (
            len(floats) == len(self.values) >= 2
            and min(floats) > 0
            and max(floats) / min(floats) >= 10
        )


def resolve_field(config: ml_collections.ConfigDict, sweep: str) -> tuple[str, str]:
    """(dotted field, short name) for a sweep name: an alias, a dotted field or a unique leaf."""
    names = field_names(config)
    if sweep in SWEEP_ALIASES:
        return SWEEP_ALIASES[sweep], sweep
    if sweep in names:
        return sweep, sweep.replace(".", "_")
    matches = [n for n in names if n.endswith("." + sweep)]
    if len(matches) == 1:
        return matches[0], sweep
    hint = f" It matches {' and '.join(matches)}; name one." if matches else ""
    raise AblationError(
        f"--sweep={sweep!r} names no config field.{hint} Use {' or '.join(SWEEP_ALIASES)} "
        f"({', '.join(f'{k} = {v}' for k, v in SWEEP_ALIASES.items())}) or a dotted field: "
        f"{', '.join(names)}"
    )


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def parse_values(config, field: str, values: Sequence[Any]) -> tuple[Any, ...]:
    """The sweep's values typed like `field`'s current value (text is converted, e.g. '1e-3')."""
    default = _get(config, field)
    typed = []
    for value in values:
        try:
            typed.append(parse_value(str(value).strip(), default, field))
        except ValueError as e:
            raise AblationError(f"--values: {e}") from None
    if not typed:
        raise AblationError(f"--values: no values given to sweep {field} over")
    repeated = sorted({str(v) for v in typed if typed.count(v) > 1})
    if repeated:
        raise AblationError(f"--values: {', '.join(repeated)} given more than once for {field}")
    return tuple(typed)


def with_value(config: ml_collections.ConfigDict, field: str, value: Any):
    """A locked copy of `config` with `field` set to `value`."""
    run_config = ml_collections.ConfigDict(config.to_dict())
    node = run_config
    *path, leaf = field.split(".")
    for part in path:
        node = node[part]
    node[leaf] = value
    run_config.lock()
    return run_config


def format_value(value: Any) -> str:
    """A value as it appears in folder names and tables: 3e-4 → "3e-4", 10 → "10"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        mantissa, exponent = f"{value:e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return str(value)


def _prefix(config) -> str:
    """`<model>_x<scale>[_<cohort>]`, as `run.identity.readable_name` begins."""
    prefix = f"{config.model.name}_x{config.scale}"
    if not config.data.root and config.data.cohort != "paper":
        prefix += f"_{config.data.cohort}"
    return prefix


def sweep_name(config, sweep: Sweep) -> str:
    """Default folder name of a sweep's table and plots, e.g. `deepsr_x8_depth_sweep`."""
    return f"{_prefix(config)}_{sweep.label}_sweep"


def run_name(config, sweep: Sweep, value: Any) -> str:
    """Workdir name of one run: the prefix plus the swept value, e.g. `deepsr_x8_depth10`."""
    prefix = _prefix(config)
    text = re.sub(r"[^A-Za-z0-9.+-]", "_", format_value(value))
    # A generic field name runs into its value ("model_width32") unless separated.
    joiner = "" if sweep.label in SWEEP_ALIASES else "-"
    return f"{prefix}_{sweep.label}{joiner}{text}"


def plan_sweep(config, sweep: str, values: Sequence[Any], runs_dir) -> tuple[Sweep, list]:
    """The sweep and its (value, config, workdir) runs, every config validated and every existing
    workdir checked before any training starts."""
    field, label = resolve_field(config, sweep)
    swept = Sweep(field, label, parse_values(config, field, values))
    runs, errors = [], []
    for value in swept.values:
        run_config = with_value(config, field, value)
        try:
            validate(run_config)
        except ValueError as e:
            errors.append(f"{field}={format_value(value)}: {e}")
            continue
        if run_config.model.name == "deepsr" and run_config.model.num_blocks < 1:
            # Valid for the config, but no network the sweep means: 3 convolutions, no block.
            errors.append(
                f"{field}={format_value(value)}: model.num_blocks must be ≥ 1 for DeepSR (0 "
                "leaves no residual block, only the input and output convolutions); sweep "
                "depths from 1"
            )
            continue
        workdir = Path(runs_dir).absolute() / run_name(run_config, swept, value)
        try:
            identity.check_same_run(
                workdir, run_config, remedy="Give another --runs folder for this sweep"
            )
        except layout.WorkdirError as error:
            errors.append(str(error))
        runs.append((value, run_config, workdir))
    if errors:
        raise AblationError("cannot run the sweep:\n  - " + "\n  - ".join(errors))
    return swept, runs


def val_results(config, workdir: Path, results: dict) -> dict:
    """Validation summary of the params a finished run scored (`eval.weights`: best or final;
    cached in `val_results.json`)."""
    path = Path(workdir) / layout.VAL_RESULTS
    key = {"best_step": results["best_step"], "step": results["step"], "lpips": config.eval.lpips}
    cached = layout.read_record(workdir, layout.VAL_RESULTS)
    if cached is not None and {k: cached.get(k) for k in key} == key:
        return cached["val"]
    mesh = sharding.make_mesh()
    model = create_model(config)
    which = "last" if config.eval.weights == "final" else "best"
    params = checkpoint.restore_params(
        workdir, abstract_params(model, config.model.in_channels, sharding.replicated(mesh)), which
    )
    root = data.resolve_root(config)
    split = layout.read_record(workdir, layout.SPLIT)
    val_set = data.build_slice_set(
        root,
        split["val"],
        eval_split=True,
        rule=config.data.eval_slices,
        guidance=mr.guidance_channels(config),  # an MR-guided sweep's T1 (and coordinates)
        neighbours=Task.neighbours_before_data(config),
    )
    task = Task.from_config(config, spacing_mm=val_set.voxel_spacing)
    scores = evaluate.evaluate_run(params, val_set, config, model=model, task=task, mesh=mesh)
    summary = evaluate.summarise(scores, val_set.patient)
    if jax.process_index() == 0:
        files.write_json_atomic(path, {**key, "val": summary})
    return summary


def _lpips_note(summary: dict, lpips_enabled: bool) -> str | None:
    """Why a split has no LPIPS (None when it has one)."""
    if "lpips" in summary.get("sr", {}):
        return None
    if "lpips_unavailable" in summary:
        return str(summary["lpips_unavailable"])
    if not lpips_enabled:
        return "not computed: eval.lpips is false (LPIPS needs VGG16 weights and is slow on CPU)"
    return "not computed when this run finished"


def split_entry(summary: dict, lpips_enabled: bool) -> dict:
    """A split in the table: bicubic and SR means and stds, slice counts, why no LPIPS."""
    entry = {image: dict(summary[image]) for image in evaluate.IMAGES}
    entry["num_slices"] = summary["num_slices"]
    entry["num_patients"] = summary["num_patients"]
    note = _lpips_note(summary, lpips_enabled)
    if note:
        entry["lpips_unavailable"] = note
    return entry


def run_sweep(
    config,
    sweep: str,
    values: Sequence[Any],
    runs_dir,
    out_dir=None,
    *,
    progress: bool = True,
) -> dict:
    """Train (or reuse) one run per value, then write the table and plots; return the table.

    `out_dir` defaults to `<runs_dir>/<model>_x<scale>[_<cohort>]_<sweep>_sweep`.
    """
    swept, runs = plan_sweep(config, sweep, values, runs_dir)
    out_dir = Path(out_dir if out_dir is not None else Path(runs_dir) / sweep_name(config, swept))
    # One writer per sweep folder: a second sweep into it stops before training anything.
    lock = WorkdirLock(out_dir, what="ablation")
    with lock if jax.process_index() == 0 else contextlib.nullcontext():
        return _sweep(config, swept, runs, out_dir, progress)


def _sweep(config, swept: Sweep, runs: list, out_dir: Path, progress: bool) -> dict:
    rows = []
    for value, run_config, workdir in runs:
        log.info("%s = %s: %s", swept.field, format_value(value), workdir)
        results = train.train_and_evaluate(run_config, workdir, progress=progress)
        val = val_results(run_config, workdir, results)
        recorded = layout.read_config(workdir)
        rows.append(
            {
                "value": value,
                "run": workdir.name,
                "workdir": str(workdir),
                "num_params": results["num_params"],
                "train_time_s": results["train_time_s"],
                "step": results["step"],
                "best_step": results["best_step"],
                "val": split_entry(val, run_config.eval.lpips),
                "test": split_entry(results["test"], recorded["eval"]["lpips"]),
            }
        )
    table = {
        "model": config.model.name,
        "scale": config.scale,
        "sweep": swept.label,
        "field": swept.field,
        "values": list(swept.values),
        "log_scale": swept.log_scale,
        "runs": rows,
    }
    if jax.process_index() == 0:
        write_sweep_outputs(table, out_dir)
    return table


def table_markdown(table: dict) -> str:
    """The sweep as a markdown table: one row per value, the bicubic baseline first."""
    name = MODEL_NAMES.get(table["model"], table["model"])
    metric_headers = [f"{split} {label}" for split in SPLITS for _, label, _, _ in TABLE_METRICS]
    lines = [
        f"# {name}, {table['scale']}× — ablation over {table['sweep']} ({table['field']})",
        "",
        "Mean ± std over the brain slices of each split, images normalised per volume to [0, 1]; "
        "SR from each run's best-validation params. Train time as the run's results.json "
        "records it (its last training session).",
        "",
        f"| {table['sweep']} | parameters | "
        + " | ".join(metric_headers)
        + " | best step / steps | train time (s) |",
        "|---|---:|" + "---|" * len(metric_headers) + "---|---:|",
    ]
    first = table["runs"][0]
    bicubic = [
        report.mean_std_cell(first[split]["bicubic"], metric, digits)
        for split in SPLITS
        for metric, _, digits, _ in TABLE_METRICS
    ]
    lines.append(f"| bicubic | — | {' | '.join(bicubic)} | — | — |")
    for row in table["runs"]:
        cells = [
            report.mean_std_cell(row[split]["sr"], metric, digits)
            for split in SPLITS
            for metric, _, digits, _ in TABLE_METRICS
        ]
        lines.append(
            f"| {format_value(row['value'])} | {row['num_params']:,} | {' | '.join(cells)} | "
            f"{row['best_step']} / {row['step']} | {row['train_time_s']:.1f} |"
        )
    reasons: dict[str, list[str]] = {}
    for row in table["runs"]:
        for split in SPLITS:
            reason = row[split].get("lpips_unavailable")
            if reason and split not in reasons.setdefault(reason, []):
                reasons[reason].append(split)
    lines += [""] * bool(reasons)
    lines += [f"LPIPS n/a ({', '.join(splits)}): {reason}" for reason, splits in reasons.items()]
    counts = ", ".join(
        f"{split} {report.count_of(first[split]['num_slices'], 'slice')} of "
        f"{report.count_of(first[split]['num_patients'], 'patient')}"
        for split in SPLITS
    )
    lines += [
        "",
        f"Slices: {counts}. Runs: " + ", ".join(f"`{r['run']}`" for r in table["runs"]) + ".",
        "",
        f"![metrics](metrics_vs_{table['sweep']}.png) ![curves](training_curves.png)",
    ]
    return "\n".join(lines) + "\n"


def _x_positions(table: dict) -> tuple[np.ndarray, list[str]]:
    """Numeric values as they are, other values (names, flags) at 0, 1, ...; and tick labels."""
    values = table["values"]
    labels = [format_value(v) for v in values]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.array(values, float), labels
    return np.arange(len(values), dtype=float), labels


def metrics_figure(table: dict):
    """SR metrics against the swept value for val and test, bicubic as horizontal lines."""
    from matplotlib.figure import Figure

    metrics = [
        m
        for m in TABLE_METRICS
        if any(m[0] in row[s]["sr"] for row in table["runs"] for s in SPLITS)
    ]
    x, ticks = _x_positions(table)
    order = np.argsort(x)
    fig = Figure(figsize=(4.2 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, (metric, label, _, higher_better) in zip(axes[0], metrics, strict=True):
        for split, colour, marker in (("val", "tab:blue", "o"), ("test", "tab:orange", "s")):
            y = np.array([row[split]["sr"].get(metric, np.nan) for row in table["runs"]])
            err = np.array([row[split]["sr"].get(metric + "_std", np.nan) for row in table["runs"]])
            ax.errorbar(
                x[order],
                y[order],
                yerr=err[order],
                color=colour,
                marker=marker,
                capsize=3,
                label=f"SR {split}",
            )
            baseline = table["runs"][0][split]["bicubic"].get(metric)
            if baseline is not None:
                ax.axhline(baseline, color=colour, linestyle="--", label=f"bicubic {split}")
        if table["log_scale"]:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(x, ticks)
        ax.set_xlabel(f"{table['sweep']} ({table['field']})")
        ax.set_ylabel(label + ("" if higher_better else " (lower is better)"))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    name = MODEL_NAMES.get(table["model"], table["model"])
    fig.suptitle(f"{name}, {table['scale']}× — mean ± std over slices")
    fig.tight_layout()
    return fig


def training_curves_figure(table: dict):
    """Train loss and validation PSNR against step, one line per run (from metrics.jsonl)."""
    return report.training_curves_figure(
        [
            (f"{table['sweep']}={format_value(row['value'])}", Path(row["workdir"]))
            for row in table["runs"]
        ]
    )


def write_sweep_outputs(table: dict, out_dir: Path) -> None:
    """ablation.json, ablation.md and the two figures, each through a temporary file."""
    out_dir = Path(out_dir)
    files.write_json_atomic(out_dir / "ablation.json", table)
    files.write_atomic(out_dir / "ablation.md", table_markdown(table).encode())
    files.save_figure_atomic(metrics_figure(table), out_dir / f"metrics_vs_{table['sweep']}.png")
    files.save_figure_atomic(training_curves_figure(table), out_dir / "training_curves.png")
