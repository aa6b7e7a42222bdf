"""The reproduction's report, and `reproduce()`, which makes it: runs, tables, figures, report.md.

`reproduce(Settings(...))` builds and checks every config first, trains or reuses the runs
(`runs`), checks that the runs of each scale measured one bicubic baseline, then writes the
tables (`tables`), figures (`figures`), results.json (every number of the tables, the runs and
the settings) and report.md (settings, tables, figures, commands and run times). One writer at
a time per output folder, and nothing written when the runs' baselines disagree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import jax

from petsr_jax.config import FLAGS
from petsr_jax.experiments.reproduce.figures import (
    ENHANCEMENT_SCALE,
    FIGURE_NUMBER,
    write_figures,
)
from petsr_jax.experiments.reproduce.runs import (
    RunRecord,
    Settings,
    build_configs,
    check_baselines,
    load_models,
    model_of,
    read_record,
    run_all,
)
from petsr_jax.experiments.reproduce.tables import (
    MODEL_SHORT,
    PAPER_SOURCE,
    scale_tables,
    table_name,
)
from petsr_jax.io import files
from petsr_jax.run import layout
from petsr_jax.run.lock import WorkdirLock


def reproduce(
    settings: Settings | None = None,
    *,
    progress: bool = True,
    command: str | None = None,
    **kwargs,
) -> dict:
    """Train or reuse the runs, then write the tables, figures and report; return the summary.

    `reproduce(scales=(8,), quick=True)` or `reproduce(Settings(...))`. Returns the dict written
    to `<out>/results.json`: settings, tables (our and the paper's numbers), figures and runs.
    """
    t_start = time.perf_counter()
    settings = settings or Settings(**kwargs)
    settings = dataclasses.replace(
        settings,
        scales=tuple(int(s) for s in settings.scales),
        runs_dir=Path(settings.runs_dir),
        out_dir=Path(settings.out_dir),
    )
    configs = build_configs(settings)
    # One writer per output folder: a second reproduce into it stops before training anything.
    with _writer_lock(settings.out_dir, "reproduce"):
        return _tables_and_figures(
            settings, configs, run_all(settings, configs, progress=progress), t_start, command
        )


def _writer_lock(folder: Path, what: str):
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return WorkdirLock(folder, what=what)


def _tables_and_figures(settings, configs, records, t_start: float, command) -> dict:
    """Tables, figures and report.md of finished runs; the summary written to results.json."""
    check_baselines(records)  # before anything is written
    models = load_models(records)
    out = settings.out_dir
    tables, table_data = {}, {}
    for scale in settings.scales:
        tables[scale], table_data[scale] = scale_tables(scale, records, configs, models, out)
    figures, enhancement = write_figures(settings.scales, configs, records, models, out)
    meta = {
        "command": command or settings.command(),
        "lpips": _lpips_availability(configs),
        "devices": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
        "wall_s": time.perf_counter() - t_start,
    }
    summary = {
        "settings": {
            "scales": list(settings.scales),
            "quick": settings.quick,
            "config_arg": settings.config_arg,
            "protocol": protocol_description(settings),
            "runs_dir": str(settings.runs_dir),
            "data": _data_description(configs[("srcnn", settings.scales[0])]),
            **meta,
        },
        "paper_source": PAPER_SOURCE,
        "tables": {str(scale): table_data[scale] for scale in settings.scales},
        "figures": {str(scale): figures[scale] for scale in settings.scales},
        "enhancement": enhancement,
        "runs": [
            {
                "model": r.model,
                "scale": r.scale,
                "workdir": str(r.workdir),
                "status": r.status,
                "wall_s": round(r.wall_s, 1),
                "step": r.results["step"],
                "train_time_s": r.results["train_time_s"],
            }
            for r in records.values()
        ],
    }
    if jax.process_index() == 0:
        for scale in settings.scales:
            files.write_atomic(out / table_name(scale), tables[scale].encode())
        files.write_json_atomic(out / "results.json", summary)
        text = report_markdown(settings, configs, records, tables, figures, enhancement, meta)
        files.write_atomic(out / "report.md", text.encode())
    return summary


def _lpips_availability(configs) -> str:
    """Whether LPIPS weights are on this machine (never downloads), in one sentence."""
    from petsr_jax.metrics import perceptual as lpips

    weights = next(iter(configs.values())).eval.lpips_weights or None
    found, where = lpips.lpips_availability(weights, allow_download=False)
    if found:
        return where
    # The first sentence says where it looked; the rest (how to provide them) is in
    # petsr_jax.metrics.perceptual.
    where = where.split(". ")[0]
    return f"weights not found ({where}); see petsr_jax.metrics.perceptual to provide them"


def _data_description(config) -> str:
    if config.data.root:
        return f"data root {config.data.root}"
    return (
        f"embedded synthetic cohort, preset {config.data.cohort!r} (seed {config.data.cohort_seed})"
    )


def protocol_description(settings: Settings) -> str:
    """Which protocol the runs follow, in words a reader of the report can act on."""
    flags = set(settings.protocol_tokens()) & set(FLAGS)
    if "tiny" in flags:
        text = "tiny (unit-test sized: a few steps; the numbers mean nothing)"
    elif settings.quick:
        text = "quick (each config's `quick` flag: small cohort, short training on a CPU)"
    else:
        text = "full paper protocol"
    text += "; the paper's data domain and metrics (`paper` flag)"
    if settings.config_arg:
        text += f", with config arg `{settings.config_arg}`"
    return text


def _split_description(record: RunRecord) -> str:
    split = read_record(record.workdir, layout.SPLIT)
    counts = ", ".join(f"{len(split[k])} {k}" for k in ("train", "val", "test"))
    return f"{counts} patients"


def report_markdown(settings, configs, records, tables, figures, enhancement, meta) -> str:
    """report.md: settings, tables, figures, commands and run times."""
    any_config = configs[("srcnn", settings.scales[0])]
    lines = [
        "# Deep Convolutional Networks for PET Super-Resolution — reproduction",
        "",
        "## Settings",
        "",
        f"- Protocol: {protocol_description(settings)}",
        f"- Data: {_data_description(any_config)}; "
        f"{_split_description(records[('srcnn', settings.scales[0])])}; evaluation slices "
        f"`{any_config.data.eval_slices}` (training uses every slice)",
        f"- Scales: {', '.join(f'{s}×' for s in settings.scales)}",
        f"- LPIPS: {meta['lpips']}",
        f"- Devices: {meta['devices']}",
        "",
        "| model | scale | epochs | lr | batch | crop | blocks × width | parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, scale), config in configs.items():
        depth = (
            f"{config.model.num_blocks} × {config.model.width}"
            if model_of(model) == "deepsr"
            else "—"
        )
        lines.append(
            f"| {MODEL_SHORT[model]} | {scale}× | {config.train.epochs} | {config.train.lr:g} | "
            f"{config.train.batch_size} | {config.data.crop_size or 'whole slice'} | {depth} | "
            f"{records[(model, scale)].results['num_params']:,} |"
        )
    lines += ["", "## Tables", ""]
    for scale in settings.scales:
        lines += [tables[scale], ""]
    lines += ["## Figures", ""]
    for scale in settings.scales:
        fig = figures[scale]
        number = FIGURE_NUMBER.get(scale)
        lines += [
            f"**{'Figure ' + str(number) if number else 'Figure'}** ({scale}×): test slices of "
            f"different patients ({', '.join(fig['slices'])}); bicubic | SRCNN | DeepSR | "
            f"original. File: `{fig['path']}`",
            "",
            f"![{scale}× comparison]({fig['path']})",
            "",
        ]
    if enhancement is not None:
        note = (
            ""
            if enhancement["scale"] == ENHANCEMENT_SCALE
            else f" (no {ENHANCEMENT_SCALE}× run was asked for; using the {enhancement['scale']}× "
            "models)"
        )
        missing_t1 = "" if all(enhancement["has_t1"]) else " Some patients have no T1 MR."
        lines += [
            f"**Figure 5** (enhancement): original test slices given to the "
            f"{enhancement['scale']}×-trained models as they are, without degradation{note}; "
            f"original | SRCNN | DeepSR | T1 MR of the same slice.{missing_t1} "
            f"File: `{enhancement['path']}`",
            "",
            f"![enhancement]({enhancement['path']})",
            "",
        ]
    lines += [
        "## Commands",
        "",
        "```",
        f"{meta['command']}",
        "```",
        "",
        "Each run alone (same workdirs):",
        "",
        "```",
        *[r.main_command(settings) for r in records.values()],
        "```",
        "",
        "## Run times",
        "",
        f"This call: {meta['wall_s']:.0f} s in total.",
        "",
        "| model | scale | workdir | this call | steps | best step | training time (s) | "
        "wall time this call (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records.values():
        lines.append(
            f"| {MODEL_SHORT[r.model]} | {r.scale}× | `{r.workdir}` | {r.status} | "
            f"{r.results['step']} | {r.results['best_step']} | {r.results['train_time_s']:.1f} | "
            f"{r.wall_s:.1f} |"
        )
    lines += [
        "",
        "Training time: the run's training wall time with its validations, summed over "
        "resumptions up to their last checkpoints. Wall time this call: data loading, "
        "compilation, training, evaluation and outputs; near zero for a reused run.",
    ]
    return "\n".join(lines) + "\n"
