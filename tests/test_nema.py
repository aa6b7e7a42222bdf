"""The NEMA IQ analysis (petsr_jax/evaluation/nema.py), the digital phantom that proves it
(petsr_jax/sim/nema_phantom.py) and launch/nema.py.

References are independent of the code under test: the blurred sphere's radial profile is
integrated numerically with scipy.integrate.quad (the analysis uses a closed form), RCs of the
phantom are computed from that profile at the phantom's voxel centres around the true centres,
and the real scan's figures are those of pynemaiqpet's published method on the same series.
"""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fresh_python_env
from scipy import integrate

from petsr_jax import Volume, deconvolution, io
from petsr_jax.evaluation import nema
from petsr_jax.sim.nema_phantom import nema_phantom

REPO = Path(__file__).resolve().parents[1]
SERIES = Path(__file__).resolve().parents[2] / "shared/data/nema-iq-pet/pet_recon_1"
FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


def quad_ball(r: float, radius: float, sigma: float) -> float:
    """A unit ball blurred by a 3D Gaussian, at distance r: the shells of radius s integrated
    numerically (each shell blurred is s / (r σ √2π) · [G(r − s) − G(r + s)])."""
    if r < 1e-9:
        density = lambda s: 4 * math.pi * s**2 * math.exp(-(s**2) / (2 * sigma**2))  # noqa: E731
        return integrate.quad(density, 0, radius)[0] / (2 * math.pi * sigma**2) ** 1.5
    shell = lambda s: (  # noqa: E731
        s
        / (r * sigma * math.sqrt(2 * math.pi))
        * (math.exp(-((r - s) ** 2) / (2 * sigma**2)) - math.exp(-((r + s) ** 2) / (2 * sigma**2)))
    )
    return integrate.quad(shell, 0, radius, points=[min(r, radius)], limit=200)[0]


def reference_profile(radius, sigma, activity, background, wall=1.5):
    """The sphere-in-wall-in-background profile on a fine table of radii, by `quad_ball`."""
    table = np.linspace(0, radius + wall + 8 * sigma + 10, 500)
    values = [
        activity * quad_ball(r, radius, sigma)
        + background * (1 - quad_ball(r, radius + wall, sigma))
        for r in table
    ]
    return lambda r: np.interp(r, table, values)


def test_blurred_sphere_closed_form_matches_numerical_integration():
    r = np.array([0.0, 0.3, 2.0, 5.0, 8.4, 9.0, 11.0, 20.0])
    for radius, sigma in ((5.0, 1.8), (18.5, 2.5), (6.5, 0.4)):
        expected = [quad_ball(x, radius, sigma) for x in r]
        np.testing.assert_allclose(nema.blurred_ball(r, radius, sigma), expected, atol=1e-9)
    profile = reference_profile(8.5, 1.9, 4.0, 1.0)
    r = np.linspace(0, 25, 40)
    np.testing.assert_allclose(nema.sphere_profile(r, 8.5, 1.9, 4.0, 1.0), profile(r), atol=1e-3)


def reference_rcs(volume, index, fwhm_mm, activity, background):
    """RC_max, RC_mean and RC_A50 of sphere `index` of a noise-free phantom, from the
    numerically integrated profile at the voxel centres around its true centre."""
    truth = volume.meta["nema_phantom"]
    spacing = np.array(volume.spacing)
    centre = np.array(truth["centres_voxel"][index]) * spacing
    radius = truth["diameters_mm"][index] / 2
    profile = reference_profile(radius, fwhm_mm / FWHM_PER_SIGMA, activity, background)
    reach = radius + 1.5 + fwhm_mm
    axes = [
        np.arange(math.floor((c - reach) / s), math.ceil((c + reach) / s) + 1) * s - c
        for c, s in zip(centre, spacing, strict=True)
    ]
    r = np.sqrt(
        axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    )
    values = profile(r)
    inner = values[r <= radius]
    threshold = background + 0.5 * (inner.max() - background)
    return {
        "rc_max": inner.max() / activity,
        "rc_mean": inner.mean() / activity,
        "rc_a50": values[values >= threshold].mean() / activity,
    }


PHANTOMS = {
    "isotropic 2 mm, 4.3 mm PSF": dict(spacing=(2.0, 2.0, 2.0), shape=(44, 160, 160), fwhm_mm=4.3),
    "scanner grid, 6 mm PSF, rotated, mirrored, off centre": dict(
        spacing=(2.78, 2.08, 2.08),
        shape=(34, 156, 156),
        fwhm_mm=6.0,
        rotation_deg=137.0,
        mirrored=True,
        ring_centre=(70.0, 84.0),
        sphere_plane=15.3,
        sphere_activity=8.0,
    ),
}


@functools.cache
def analysed(name: str):
    """A noise-free phantom and its analysis against the true sphere activity (once each)."""
    volume = nema_phantom(supersample=3, **PHANTOMS[name])
    truth = volume.meta["nema_phantom"]
    return volume, nema.analyse(volume, true_activity=truth["sphere_activity"])


@pytest.mark.parametrize("name", list(PHANTOMS))
def test_digital_phantom_fwhm_within_0_2_mm_and_rcs_within_2_percent(name):
    volume, result = analysed(name)
    truth = volume.meta["nema_phantom"]
    assert [s["diameter_mm"] for s in result["spheres"]] == [37, 28, 22, 17, 13, 10]
    for index, sphere in enumerate(result["spheres"]):
        assert abs(sphere["fwhm_mm"] - truth["fwhm_mm"]) < 0.2, sphere
        expected = reference_rcs(
            volume,
            index,
            truth["fwhm_mm"],
            truth["sphere_activity"],
            truth["background_activity"],
        )
        for key, value in expected.items():
            assert sphere[key] == pytest.approx(value, rel=0.02), (sphere["diameter_mm"], key)
        true_centre = np.array(truth["centres_voxel"][index]) * volume.spacing
        found = np.array(sphere["centre_voxel"]) * volume.spacing
        assert np.linalg.norm(found - true_centre) < 0.2
    assert result["background"]["mean"] == pytest.approx(truth["background_activity"], rel=1e-3)
    assert result["background"]["cov"] < 1e-3
    assert result["ring"]["mirrored"] == truth["mirrored"]
    turn = (result["ring"]["rotation_deg"] - truth["rotation_deg"] + 180) % 360 - 180
    assert abs(turn) <= 1.0


def test_default_true_activity_is_the_fitted_plateau_of_the_largest_sphere():
    volume, _ = analysed(next(iter(PHANTOMS)))
    result = nema.analyse(volume)
    assert result["true_activity_source"].startswith("fitted")
    assert result["true_activity"] == pytest.approx(
        volume.meta["nema_phantom"]["sphere_activity"], rel=0.01
    )


def test_noisy_phantom_spheres_found_where_they_are():
    volume = nema_phantom(supersample=3, noise=0.3, seed=3, rotation_deg=250.0)
    result = nema.analyse(volume, true_activity=4.0)
    truth = volume.meta["nema_phantom"]
    for sphere, centre in zip(result["spheres"], truth["centres_voxel"], strict=True):
        distance = np.linalg.norm((np.array(sphere["centre_voxel"]) - centre) * volume.spacing)
        assert distance < 1.0, sphere["diameter_mm"]
    for sphere in result["spheres"][:3]:
        assert abs(sphere["fwhm_mm"] - 4.3) < 0.4
    assert result["background"]["cov"] == pytest.approx(0.3, abs=0.02)
    variability = result["background"]["variability_percent"]
    # Averaging over larger ROIs leaves less of white noise.
    assert variability["37"] < variability["17"] < variability["10"]


def test_compare_gives_ratios_against_the_before_true_activity():
    def analysis(fwhms, rc_a50, cov, mean, total, truth):
        spheres = [
            {"diameter_mm": d, "fwhm_mm": f, "rc_a50": a, "rc_max": 2 * a}
            for d, f, a in zip(nema.DIAMETERS_MM, fwhms, rc_a50, strict=True)
        ]
        return {
            "spheres": spheres,
            "background": {"cov": cov, "mean": mean},
            "total_activity": total,
            "true_activity": truth,
            "units": "BQML",
        }

    before = analysis([4.0] * 6, [0.9] * 6, 0.2, 100.0, 1000.0, 10.0)
    after = analysis([2.0] * 6, [0.6] * 6, 0.5, 98.0, 1010.0, 20.0)
    comparison = nema.compare(before, after)
    assert comparison["background_cov_ratio"] == pytest.approx(2.5)
    assert comparison["background_mean_change_percent"] == pytest.approx(-2.0)
    assert comparison["total_activity_change_percent"] == pytest.approx(1.0)
    first = comparison["spheres"][0]
    assert first["fwhm_ratio"] == pytest.approx(0.5)
    # After RCs are rescaled to the before's true activity: 0.6 of 20 is 1.2 of 10.
    assert first["rc_a50_after"] == pytest.approx(1.2)
    assert first["rc_max_after"] == pytest.approx(2.4)
    with pytest.raises(nema.NemaError, match="SUVbw"):
        nema.compare(before, {**after, "units": "SUVbw"})


def test_write_report_writes_all_three_files_or_refuses(tmp_path):
    _, result = analysed(next(iter(PHANTOMS)))
    out = tmp_path / "report"
    written = nema.write_report(out, result, after=result, labels=("input", "same"))
    assert sorted(p.name for p in written) == sorted(nema.FILES)
    record = json.loads((out / "nema.json").read_text())
    # A noise-free background has no CoV to take a ratio of: null, not a division by zero.
    assert record["comparison"]["background_cov_ratio"] is None
    assert record["comparison"]["spheres"][0]["fwhm_ratio"] == pytest.approx(1.0)
    assert "| 37 |" in (out / "nema.md").read_text()
    assert (out / "nema.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(io.ScanError, match="already exists"):
        nema.write_report(out, result)
    assert sorted(p.name for p in out.iterdir()) == sorted(nema.FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ bad input


def _brain_like(rng) -> Volume:
    """A head: an ellipsoid with a hot cortical shell and hot blobs, no spheres, no ring."""
    from scipy import ndimage

    z, y, x = np.mgrid[0:60, 0:128, 0:128].astype(float)
    r = np.sqrt(((z - 30) / 28) ** 2 + ((y - 64) / 55) ** 2 + ((x - 64) / 45) ** 2)
    head = np.where(r < 1, 4000.0, 0.0) + np.where((r < 0.95) & (r > 0.8), 6000.0, 0.0)
    for c in rng.uniform([15, 30, 30], [45, 98, 98], (8, 3)):
        head += 8000 * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / 18)
    head = ndimage.gaussian_filter(head * (r < 1), 1.5) + rng.normal(0, 300, head.shape)
    return Volume(np.maximum(head, 0), (2.0, 2.0, 2.0))


def _cut(volume, axis: int, start: int) -> Volume:
    index = [slice(None)] * 3
    index[axis] = slice(start, None)
    return volume.replace(data=volume.data[tuple(index)])


@pytest.fixture(scope="module")
def noisy_phantom():
    return nema_phantom(supersample=3, noise=0.2, seed=1, shape=(40, 160, 160))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda rng, p: Volume(rng.gamma(4.0, 250.0, (40, 128, 128)), (2.0,) * 3), "not found"),
        (lambda rng, p: _brain_like(rng), "not found"),
        (lambda rng, p: Volume(np.zeros((10, 32, 32)), (2.0,) * 3), "no activity"),
        (
            lambda rng, p: nema_phantom(supersample=3, noise=0.2, sphere_activity=1.0),
            "37 mm, 28 mm, 22 mm, 17 mm, 13 mm, 10 mm not found",
        ),
        (lambda rng, p: _cut(p, 0, 17), "cut by the field of view .*first slice"),
        (lambda rng, p: _cut(p, 2, 55), "17 mm sphere is cut by the field of view"),
    ],
    ids=["noise", "brain", "empty", "no hot spheres", "cut axially", "cut in plane"],
)
def test_bad_input_names_what_was_not_found(make, message, noisy_phantom):
    volume = make(np.random.default_rng(0), noisy_phantom)
    with pytest.raises(nema.NemaError, match=message) as caught:
        nema.analyse(volume)
    assert "\n" not in str(caught.value)


def _launch(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "nema.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=fresh_python_env(),
        cwd=cwd,
        timeout=600,
    )


def test_launch_refuses_a_scan_that_is_not_a_phantom_and_writes_nothing(tmp_path):
    noise = np.random.default_rng(0).gamma(4.0, 250.0, (30, 96, 96))
    scan = io.write_nifti(Volume(noise, (2.0, 2.0, 2.0), units="BQML"), tmp_path / "noise.nii.gz")
    out = tmp_path / "report"
    done = _launch(f"--input={scan}", f"--out={out}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.nii.gz"]


# ------------------------------------------------------------------------------ the real scan


def test_measure_scan_with_a_workdir_writes_both_analyses_or_names_the_enhanced_scan(
    tiny_deepsr_workdir, tmp_path
):
    """Whatever a model does to the phantom, `--workdir` either reports both analyses or
    refuses with one line naming the enhanced scan, and writes nothing."""
    scan = io.write_nifti(
        nema_phantom(supersample=3, noise=0.2, shape=(30, 160, 160)),
        tmp_path / "phantom.nii.gz",
    )
    out = tmp_path / "report"
    try:
        tables = nema.measure_scan(scan, out, workdir=tiny_deepsr_workdir)
    except nema.NemaError as error:
        assert "enhanced by" in str(error) and "\n" not in str(error)
        assert not out.exists()
    else:
        record = json.loads((out / "nema.json").read_text())
        assert {"after", "comparison"} <= set(record)
        assert len(record["comparison"]["spheres"]) == 6
        assert "FWHM ratio" in tables


@pytest.mark.skipif(not SERIES.is_dir(), reason=f"the NEMA IQ series is not at {SERIES}")
def test_real_scan_end_to_end_lands_near_pynemaiqpet_and_compares_deconvolution(tmp_path):
    """launch/nema.py on the scanner's series, compared with its Richardson–Lucy deconvolution.
    pynemaiqpet (fixed background, one shared sphere activity, 1/r weights) measured on it: FWHM
    4.8 / 4.3 / 4.1 / 4.4 / 4.3 mm (37 → 13 mm), RC_A50 0.98 / 1.02 / 0.95 / 0.84 (37, 28, 22,
    13 mm), background 1,687 with CoV 0.350."""
    volume = io.read_volume(SERIES)
    sharper = io.write_nifti(deconvolution.deconvolve(volume, 4.3, 10), tmp_path / "rl10.nii.gz")
    out = tmp_path / "nema"
    done = _launch(f"--input={SERIES}", f"--out={out}", f"--compare={sharper}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| 37 |" in done.stdout
    result = json.loads((out / "nema.json").read_text())
    spheres = {s["diameter_mm"]: s for s in result["spheres"]}
    assert list(spheres) == [37, 28, 22, 17, 13, 10]
    for diameter, fwhm in zip((37, 28, 22, 17, 13), (4.8, 4.3, 4.1, 4.4, 4.3), strict=True):
        assert abs(spheres[diameter]["fwhm_mm"] - fwhm) < 0.5, diameter
    for diameter, rc in zip((37, 28, 22, 13), (0.98, 1.02, 0.95, 0.84), strict=True):
        assert abs(spheres[diameter]["rc_a50"] - rc) < 0.05, diameter
    assert result["background"]["mean"] == pytest.approx(1687, rel=0.02)
    assert result["background"]["cov"] == pytest.approx(0.350, abs=0.02)
    for sphere in result["spheres"]:
        assert {"rc_max", "rc_mean", "centre_mm", "earl"} <= set(sphere)
    assert {"true_activity", "units", "total_activity"} <= set(result)
    assert sorted(os.listdir(out)) == sorted(nema.FILES)
    # Deconvolution sharpens every sphere, raises recovery and noise, keeps activity.
    comparison = result["comparison"]
    for sphere in comparison["spheres"]:
        assert sphere["fwhm_ratio"] < 0.75
        assert sphere["rc_a50_after"] > sphere["rc_a50_before"]
    assert comparison["background_cov_ratio"] > 1.5
    assert abs(comparison["total_activity_change_percent"]) < 0.01
