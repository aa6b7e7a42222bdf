"""The paper's results in one call: Tables 1–3, Figures 2–5 and a report, from ten runs.

`reproduce(scales=(8, 12, 16), quick=False)` trains multi-scale SRCNN and DeepSR at every scale,
plus at 8× DeepSR with the paper text's image-level skip beside the authors' feature-level one,
and at every scale the MR-guided DeepSR (the `mr` flag: PET plus the co-registered T1), the
paper's future work (or reuses their finished workdirs: `train.train_and_evaluate` skips a
finished run and resumes an interrupted one). Every run is of the paper's domain and protocol
(the `paper` config flag: each slice min–max scaled to 8 bits, PIL-style 8-bit degradation,
batch 16, no flips, final weights), so the tables are scored as the authors scored theirs. It
then writes into the output folder:

    table{1,2,3}_x{8,12,16}.md   rows "Input LR (N× + bicubic)", "Output SR from multi-scale
                                 SRCNN", "Output SR from DeepSR" (and at 8× the image-skip
                                 DeepSR); PSNR, SSIM (scikit-image's default window), LPIPS as
                                 mean ± std over test slices, the paper's published numbers
                                 beside them; then a second table of the same outputs mapped back
                                 to each volume's own scale (whole slice and brain), and at 8×
                                 the regional recovery of grey matter and lesions
    figure{2,3,4}_x{8,12,16}.png test slices of different patients: bicubic | SRCNN | DeepSR |
                                 original (the same slices for both models)
    mr_comparison_x{8,12,16}.*   PET-only vs MR-guided DeepSR: PSNR / SSIM whole and brain,
                                 grey-matter and lesion activity errors (.md, .json, also in the
                                 table file), and test slices with a lesion: PET-only |
                                 MR-guided | original | T1 (.png)
    figure5_enhancement.png      original slice | SRCNN(original) | DeepSR(original) | T1 MR, with
                                 the 8× models applied to the undegraded image
    results.json                 every number of the tables, the runs and the settings
    report.md                    tables, figures, commands, run times and settings

The bicubic row of a table is measured once per run, by the SRCNN run and by every other run of
the same scale; all share the test split and the one `degrade()`, so the measurements must
agree. `reproduce` checks that they do and stops with `ReproduceError` otherwise: a mismatch means
the runs did not see the same test data, and no table built from them would be a comparison.

The figures come from the params each run scored (its final weights), loaded as a user would
(`petsr_jax.inference.load`): Figures 2–4 degrade the test slices and recover them
(`reconstruct`), Figure 5 applies the networks to the original slices as they are (`enhance`).

Each run lives in `<runs>/<model>_x<scale>[_quick][_tiny][_<hash of key=value overrides>]`, so a
quick run never answers for a full one. A workdir whose `config.json` differs from the config
asked for in a field that changes results is refused rather than silently reused.

The modules, by role: `runs` (which runs, training or reusing them, whether their baselines
agree), `tables`, `figures`, and `report` (report.md, and `reproduce()` itself). Every public
name of them is importable from here.
"""

from petsr_jax.experiments.reproduce.figures import (
    ENHANCEMENT_FIGURE,
    ENHANCEMENT_SCALE,
    FIGURE_NUMBER,
    FigureSlices,
    comparison_panels,
    enhancement_figure,
    enhancement_panels,
    figure_name,
    figure_slices,
    scale_figure,
    write_figures,
)
from petsr_jax.experiments.reproduce.report import (
    protocol_description,
    report_markdown,
    reproduce,
)
from petsr_jax.experiments.reproduce.runs import (
    BICUBIC_RTOL,
    MODELS,
    PAPER_SCALES,
    VARIANTS,
    ReproduceError,
    RunRecord,
    Settings,
    build_configs,
    check_baselines,
    check_bicubic_agrees,
    load_models,
    model_of,
    read_record,
    run_all,
    run_name,
)
from petsr_jax.experiments.reproduce.tables import (
    METRICS,
    MODEL_ROW,
    MODEL_SHORT,
    PAPER_SOURCE,
    PAPER_TABLES,
    PHYSICAL_METRICS,
    REGIONAL_SCALE,
    TABLE_NUMBER,
    lpips_note,
    physical_table_markdown,
    regional_markdown,
    regional_recovery,
    scale_tables,
    table_markdown,
    table_name,
    table_rows,
)

__all__ = [
    "BICUBIC_RTOL",
    "ENHANCEMENT_FIGURE",
    "ENHANCEMENT_SCALE",
    "FIGURE_NUMBER",
    "METRICS",
    "MODELS",
    "MODEL_ROW",
    "MODEL_SHORT",
    "PAPER_SCALES",
    "PAPER_SOURCE",
    "PAPER_TABLES",
    "PHYSICAL_METRICS",
    "REGIONAL_SCALE",
    "TABLE_NUMBER",
    "VARIANTS",
    "FigureSlices",
    "ReproduceError",
    "RunRecord",
    "Settings",
    "build_configs",
    "check_baselines",
    "check_bicubic_agrees",
    "comparison_panels",
    "enhancement_figure",
    "enhancement_panels",
    "figure_name",
    "figure_slices",
    "load_models",
    "lpips_note",
    "model_of",
    "physical_table_markdown",
    "protocol_description",
    "read_record",
    "regional_markdown",
    "regional_recovery",
    "report_markdown",
    "reproduce",
    "run_all",
    "run_name",
    "scale_figure",
    "scale_tables",
    "table_markdown",
    "table_name",
    "table_rows",
    "write_figures",
]
