"""The one-command reproduction on unit-test settings: tables (three rows per scale, one bicubic
baseline, numbers equal to the per-slice scores, the paper's numbers as PAPER.md prints them),
figures (a row per test patient, four columns), the report, reuse of finished runs without
retraining (through the command line), and loud failures on runs that cannot share a table."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import blob_volume, make_nifti_root

from petsr_jax import io
from petsr_jax.config import build_config
from petsr_jax.experiments import reproduce
from petsr_jax.models import create_model
from petsr_jax.run import checkpoint, identity
from petsr_jax.volume import Volume

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO.parent / "shared" / "PAPER.md"
SCALES = (8, 12)
TEST_PATIENTS = ["pat-03", "pat-04"]


def _data_root(path: Path) -> Path:
    """Five NIfTI patients with masks and T1s; two of them in the test split, so the figures
    show slices of two different patients."""
    root = make_nifti_root(path, n_patients=5)
    (root / "t1").mkdir()
    for p in range(5):
        vol, _ = blob_volume(p)
        io.write_nifti(
            Volume(np.sqrt(vol), (2.0, 2.0, 2.0), patient_id=f"pat-{p:02d}"),
            root / "t1" / f"pat-{p:02d}.nii.gz",
        )
    split = {"train": ["pat-00", "pat-01"], "val": ["pat-02"], "test": TEST_PATIENTS}
    (root / "split.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    base = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as mp:
        # Module fixtures run before the per-test cache isolation of conftest.
        mp.setenv("PETSR_CACHE_DIR", str(base / "slice_cache"))
        root = _data_root(base / "root")
        settings = reproduce.Settings(
            scales=SCALES,
            config_arg=f"tiny,data.root={root},eval.batch_size=4",
            runs_dir=base / "runs",
            out_dir=base / "out",
        )
        summary = reproduce.reproduce(settings, progress=False)
    return settings, summary


def _section(text: str, heading_start: str) -> str:
    start = text.index(heading_start)
    end = text.find("\n#", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _table_rows(section: str) -> list[list[str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def _mean_std(cell: str) -> tuple[float, float]:
    mean, std = cell.split("±")
    return float(mean), float(std)


def _scores(settings, model, scale) -> dict:
    workdir = settings.runs_dir / reproduce.run_name(model, scale, settings)
    return json.loads((workdir / "test_scores.json").read_text())


def test_each_table_has_the_three_paper_rows_with_one_bicubic_baseline(reproduced):
    settings, _ = reproduced
    text = (settings.out_dir / "report.md").read_text()
    for scale in SCALES:
        number = reproduce.TABLE_NUMBER[scale]
        section = _section(text, f"### Table {number}: {scale}×")
        rows = _table_rows(section)
        # At 8×, DeepSR with the paper text's image-level skip beside the authors' network;
        # at every scale the MR-guided DeepSR.
        variants = (["deepsr_image"] if scale == 8 else []) + ["deepsr_mr"]
        assert [r[0] for r in rows] == [
            f"Input LR ({scale}× + bicubic)",
            "Output SR from multi-scale SRCNN",
            "Output SR from DeepSR",
        ] + [reproduce.MODEL_ROW[v] for v in variants]
        # Ours, against numpy over the per-slice scores each run wrote (not via summarise).
        runs = list(reproduce.MODELS) + variants
        by_row = {0: [_scores(settings, m, scale)["bicubic/psnr"] for m in runs]}
        by_row.update({i + 1: [_scores(settings, m, scale)["sr/psnr"]] for i, m in enumerate(runs)})
        for i, per_slice_lists in by_row.items():
            mean, std = _mean_std(rows[i][1])
            for per_slice in per_slice_lists:  # bicubic: the SRCNN and the DeepSR run agree
                assert len(per_slice) > 0
                assert mean == pytest.approx(np.mean(per_slice), abs=0.005)
                assert std == pytest.approx(np.std(per_slice), abs=0.005)
        ssim_mean, _ = _mean_std(rows[0][2])
        ssim_ref = np.mean(_scores(settings, "deepsr", scale)["bicubic/ssim"])
        assert ssim_mean == pytest.approx(ssim_ref, abs=0.0005)
        assert all(r[3] == "n/a (not computed: eval.lpips=false)" for r in rows)
        assert all(len(r) == 7 for r in rows)  # our 3 metrics, then the paper's 3
        assert "Paper PSNR (dB)" in section and "private" in section
        assert "scikit-image's defaults" in section
        # The second table: the same outputs per volume, whole slice and brain.
        per_volume = _table_rows(_section(text, f"#### The same outputs per volume, {scale}×"))
        assert [r[0] for r in per_volume] == [r[0] for r in rows]
        mean, _ = _mean_std(per_volume[2][3])
        brain = _scores(settings, "deepsr", scale)["sr/psnr_brain"]
        assert mean == pytest.approx(np.mean(brain), abs=0.005)
    assert "#### Regional recovery, 8×" in text
    for scale in SCALES:  # PET-only vs MR-guided: scores, grey-matter and lesion errors
        section = _section(text, f"#### PET-only vs MR-guided DeepSR, {scale}×")
        table = section.split("\n\nScores:")[0]  # the paired lesion differences follow
        labels = [r[0] for r in _table_rows(table)]
        assert labels[:2] == ["bicubic", "PET-only"] and len(labels) == 3
        assert labels[2] == "MR-guided (anchored per 4×4 block)"
        assert "MR-guided |mean err| − PET-only |mean err|" in section
        assert "lesion CRC" in section and r"below-GM lesion \|mean err\| %" in section
        assert (settings.out_dir / f"mr_comparison_x{scale}.json").exists()
    for scale in SCALES:
        table_file = settings.out_dir / reproduce.table_name(scale)
        assert table_file.read_text() in text


def _paper_tables(path: Path) -> dict[int, list[tuple[str, str, str]]]:
    """Tables 1–3 as PAPER.md prints them: scale → [(psnr, ssim, lpips)] for the three rows."""
    tables, scale = {}, None
    for line in path.read_text().splitlines():
        if m := re.match(r"Table \d\. .*?for\s+\$(\d+) \\times", line):
            scale = int(m.group(1))
        fields = line.split("\t")
        if scale and len(fields) == 4 and fields[0].startswith(("Input LR", "Output SR")):
            tables.setdefault(scale, []).append(tuple(f.strip() for f in fields[1:]))
    return tables


@pytest.mark.skipif(not PAPER.is_file(), reason=f"the paper's text is not at {PAPER}")
def test_the_paper_columns_are_the_published_tables():
    published = _paper_tables(PAPER)
    assert sorted(published) == [8, 12, 16]
    for scale, rows in published.items():
        ours = reproduce.PAPER_TABLES[scale]
        assert rows == [ours["bicubic"], ours["srcnn"], ours["deepsr"]]


def test_the_paper_columns_appear_in_the_report(reproduced):
    settings, _ = reproduced
    text = (settings.out_dir / "report.md").read_text()
    for scale in SCALES:
        rows = _table_rows(_section(text, f"### Table {reproduce.TABLE_NUMBER[scale]}:"))
        paper = reproduce.PAPER_TABLES[scale]
        assert [tuple(r[4:]) for r in rows[:3]] == [
            paper[k] for k in ("bicubic", "srcnn", "deepsr")
        ]


def test_figures_have_a_row_per_test_patient_and_the_four_columns(reproduced):
    from PIL import Image

    settings, summary = reproduced
    # image_grid draws 3 × 3-inch panels at 100 dpi.
    expected_size = (4 * 300, len(TEST_PATIENTS) * 300)
    for scale in SCALES:
        path = settings.out_dir / reproduce.figure_name(scale)
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == expected_size
        figure = summary["figures"][str(scale)]
        assert [s.split()[0] for s in figure["slices"]] == TEST_PATIENTS
    enhancement = summary["enhancement"]
    assert enhancement["scale"] == 8 and enhancement["has_t1"] == [True, True]
    with Image.open(settings.out_dir / "figure5_enhancement.png") as png:
        assert png.size == expected_size
    # The comparison figures of both scales show the same slices (same test split).
    assert len({tuple(summary["figures"][str(s)]["slices"]) for s in SCALES}) == 1


def _paper_input(image: np.ndarray, scale: int) -> tuple[np.ndarray, float, float]:
    """The authors' network input for a slice: min–max to uint8 (`· 256`, truncated; their
    overflow of the brightest pixel left out), PIL bicubic down ×scale and back up on the 8-bit
    image; returned / 255 with the slice's (low, span)."""
    from PIL import Image

    low, span = float(image.min()), float(image.max() - image.min())
    hr8 = np.minimum((image - low) * (256.0 / span), 255).astype(np.uint8)
    h, w = image.shape
    small = Image.fromarray(hr8).resize((w // scale, h // scale), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC)) / 255.0, low, span


def _apply(settings, model_name, scale, images):
    """The params a run scored (final weights, the paper protocol) applied to [N, H, W]
    images in the network's domain, by flax directly."""
    config = build_config(model_name, settings.model_arg(scale))
    model = create_model(config)
    like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    workdir = settings.runs_dir / reproduce.run_name(model_name, scale, settings)
    params = checkpoint.restore_params(workdir, like, which="last")
    batch = jnp.asarray(images, jnp.float32)[..., None]
    return np.asarray(model.apply({"params": params}, batch))[..., 0]


def test_figure_panels_are_the_test_slices_their_degradation_model_outputs_and_t1(reproduced):
    from petsr_jax import inference

    settings, _ = reproduced
    scale = 8
    workdir = settings.runs_dir / reproduce.run_name("srcnn", scale, settings)
    slices = reproduce.figure_slices(build_config("srcnn", settings.model_arg(scale)), workdir)
    assert slices.patient == TEST_PATIENTS
    # The originals and T1s are the arrays the data root was written from.
    volumes = [blob_volume(int(pid.split("-")[1]))[0] for pid in slices.patient]
    for hr, vol, z in zip(slices.hr, volumes, slices.slice_index, strict=True):
        np.testing.assert_allclose(hr, vol[z] / vol.max(), rtol=1e-6)
    models = {
        m: inference.load(settings.runs_dir / reproduce.run_name(m, scale, settings))
        for m in reproduce.MODELS
    }
    panels = reproduce.comparison_panels(models["srcnn"], models["deepsr"], slices.hr)
    inputs = [_paper_input(hr, scale) for hr in slices.hr]
    lr = np.stack([x for x, _, _ in inputs])
    low, span = (np.array([v[k] for v in inputs])[:, None, None] for k in (1, 2))
    # Within one grey level of PIL: its fixed-point rounding may differ on a half.
    np.testing.assert_allclose(panels["bicubic"], low + span * lr, atol=1.01 / 255 * span.max())
    assert (
        np.abs(panels["bicubic"][0] - (low + span * _paper_input(slices.hr[0], 12)[0])[0]).max()
        > 1e-2
    )
    for m in reproduce.MODELS:
        expected = low + span * _apply(settings, m, scale, lr)
        np.testing.assert_allclose(panels[m], expected, atol=0.02 * span.max())
    enhanced = reproduce.enhancement_panels(models["srcnn"], models["deepsr"], slices)
    hr8 = np.stack([_paper_input(hr, 1)[0] for hr in slices.hr])  # no degradation
    for m in reproduce.MODELS:
        # Figure 5 feeds the original itself, not its degraded version.
        expected = low + span * _apply(settings, m, scale, hr8)
        np.testing.assert_allclose(enhanced[m], expected, atol=1e-4 * span.max())
        assert np.abs(enhanced[m] - panels[m]).max() > 1e-3
    for t1, vol, z in zip(enhanced["t1"], volumes, slices.slice_index, strict=True):
        np.testing.assert_allclose(t1, np.sqrt(vol[z]), rtol=1e-6)


def test_report_names_settings_figures_commands_and_run_times(reproduced):
    settings, summary = reproduced
    text = (settings.out_dir / "report.md").read_text()
    for scale in SCALES:
        name = reproduce.figure_name(scale)
        assert f"]({name})" in text and (settings.out_dir / name).is_file()
    assert "](figure5_enhancement.png)" in text
    assert settings.command() in text
    assert "Protocol: tiny" in text and "2 train, 1 val, 2 test patients" in text
    assert "LPIPS:" in text
    runs = _section(text, "## Run times")
    statuses = re.findall(r"\| (SRCNN|DeepSR) \| (\d+)× \| `[^`]+` \| (\w+) \|", runs)
    assert sorted((m, int(s)) for m, s, _ in statuses) == sorted(
        (reproduce.MODEL_SHORT[m], s) for m in reproduce.MODELS for s in SCALES
    )
    assert {status for _, _, status in statuses} == {"trained"}
    on_disk = json.loads((settings.out_dir / "results.json").read_text())
    assert on_disk["tables"] == json.loads(json.dumps(summary["tables"]))
    assert not list(settings.out_dir.glob(".*.tmp"))  # no temporary file left behind


def test_rerunning_the_command_reuses_finished_runs(reproduced, tmp_path):
    settings, summary = reproduced
    workdirs = [
        settings.runs_dir / reproduce.run_name(m, s, settings)
        for m in reproduce.MODELS
        for s in SCALES
    ]
    before = {w: (w / "metrics.jsonl").read_bytes() for w in workdirs}
    mtimes = {w: (w / "results.json").stat().st_mtime_ns for w in workdirs}
    out = tmp_path / "again"
    cmd = [
        sys.executable,
        str(REPO / "launch" / "reproduce.py"),
        f"--scales={','.join(map(str, SCALES))}",
        f"--runs={settings.runs_dir}",
        f"--out={out}",
        f"--config_arg={settings.config_arg}",
    ]
    # No tcmalloc re-execution (a second interpreter start): the allocator is not checked here.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PETSR_ALLOCATOR": "system"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for w in workdirs:
        assert (w / "metrics.jsonl").read_bytes() == before[w], f"{w} trained again"
        assert (w / "results.json").stat().st_mtime_ns == mtimes[w]
    again = json.loads((out / "results.json").read_text())
    assert {r["status"] for r in again["runs"]} == {"reused"}
    assert again["tables"] == json.loads(json.dumps(summary["tables"]))


def _copy_runs(settings, scale, dest: Path) -> reproduce.Settings:
    copied = reproduce.Settings(
        scales=(scale,),
        config_arg=settings.config_arg,
        runs_dir=dest / "runs",
        out_dir=dest / "out",
    )
    variants = [v for v, (_, _, scales) in reproduce.VARIANTS.items() if scale in scales]
    for model in list(reproduce.MODELS) + variants:
        name = reproduce.run_name(model, scale, settings)
        shutil.copytree(settings.runs_dir / name, copied.runs_dir / name)
    return copied


def _record(settings, model, scale) -> reproduce.RunRecord:
    workdir = settings.runs_dir / reproduce.run_name(model, scale, settings)
    results = json.loads((workdir / "results.json").read_text())
    return reproduce.RunRecord(model, scale, workdir, "reused", 0.0, results)


def test_a_bicubic_baseline_that_differs_between_the_models_stops_the_report(
    reproduced, tmp_path, monkeypatch
):
    settings, _ = reproduced
    copied = _copy_runs(settings, 8, tmp_path)
    reproduce.check_bicubic_agrees(_record(copied, "srcnn", 8), _record(copied, "deepsr", 8))

    scores_path = copied.runs_dir / reproduce.run_name("deepsr", 8, copied) / "test_scores.json"
    scores = json.loads(scores_path.read_text())
    scores["bicubic/psnr"][1] += 0.3
    scores_path.write_text(json.dumps(scores))
    with pytest.raises(reproduce.ReproduceError, match=r"bicubic psnr differs .*slice 1"):
        reproduce.check_bicubic_agrees(_record(copied, "srcnn", 8), _record(copied, "deepsr", 8))

    # Through the whole pipeline, on a summary that disagrees: nothing is written.
    scores["bicubic/psnr"][1] -= 0.3
    scores_path.write_text(json.dumps(scores))
    results_path = scores_path.with_name("results.json")
    results = json.loads(results_path.read_text())
    results["test"]["bicubic"]["ssim"] += 0.01
    results_path.write_text(json.dumps(results))
    monkeypatch.setenv("PETSR_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(reproduce.ReproduceError, match="bicubic ssim in results.json differs"):
        reproduce.reproduce(copied, progress=False)
    assert not copied.out_dir.exists()


def test_runs_on_different_test_splits_cannot_share_a_table(reproduced, tmp_path):
    settings, _ = reproduced
    copied = _copy_runs(settings, 12, tmp_path)
    split_path = copied.runs_dir / reproduce.run_name("srcnn", 12, copied) / "split.json"
    split = json.loads(split_path.read_text())
    split["test"] = split["test"][:1]
    split_path.write_text(json.dumps(split))
    with pytest.raises(reproduce.ReproduceError, match="different test patients"):
        reproduce.check_bicubic_agrees(_record(copied, "srcnn", 12), _record(copied, "deepsr", 12))


def test_a_workdir_of_another_protocol_is_refused_not_reused(reproduced):
    settings, _ = reproduced
    workdir = settings.runs_dir / reproduce.run_name("srcnn", 8, settings)
    config_json = (workdir / "config.json").read_bytes()
    longer = build_config("srcnn", settings.model_arg(8) + ",train.epochs=3")
    # Refused as every reproduce problem is, naming the field and both values.
    with pytest.raises(reproduce.ReproduceError, match=r"train\.epochs: 1 in the workdir, 3 now"):
        reproduce.run_all(settings, {("srcnn", 8): longer}, progress=False)
    assert (workdir / "config.json").read_bytes() == config_json
    # Logging cadence changes no number in the tables.
    chatty = build_config("srcnn", settings.model_arg(8) + ",train.log_every_steps=1")
    identity.check_same_run(workdir, chatty)


def test_run_names_keep_protocols_apart():
    full, quick = reproduce.Settings(), reproduce.Settings(quick=True)
    tiny = reproduce.Settings(config_arg="tiny")
    tiny_longer = reproduce.Settings(config_arg="tiny,train.epochs=2")
    names = {reproduce.run_name("deepsr", 8, s) for s in (full, quick, tiny, tiny_longer)}
    assert len(names) == 4
    assert reproduce.run_name("deepsr", 8, full) == "deepsr_x8_paper"
    assert reproduce.run_name("srcnn", 12, quick) == "srcnn_x12_paper_quick"
    # Order of the arg does not matter; the name does not depend on the process.
    assert reproduce.run_name("srcnn", 8, tiny_longer) == reproduce.run_name(
        "srcnn", 8, reproduce.Settings(config_arg="train.epochs=2,tiny")
    )


@pytest.mark.parametrize(
    ("config_arg", "scales", "message"),
    [
        ("tiny,scale=4", (8,), "sets scale"),
        ("tiny,fast", (8,), "unknown flag 'fast'"),
        ("tiny,train.lr=-1", (8,), r"srcnn at 8×: invalid config"),
        ("tiny", (8, 8), "names a scale twice"),
    ],
)
def test_bad_settings_fail_before_any_training(config_arg, scales, message, tmp_path):
    settings = reproduce.Settings(
        scales=scales, config_arg=config_arg, runs_dir=tmp_path / "runs", out_dir=tmp_path
    )
    with pytest.raises(reproduce.ReproduceError, match=message):
        reproduce.reproduce(settings, progress=False)
    assert not (tmp_path / "runs").exists()
