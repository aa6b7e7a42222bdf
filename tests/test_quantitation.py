"""`petsr_jax.quantitation`: negative activity clipped and counted, changes of total and maximum
activity against the input, and the record beside enhanced outputs."""

import json

import numpy as np
import pytest

from petsr_jax import quantitation
from petsr_jax.io.units import is_activity_concentration


def test_clip_negative_zeroes_and_counts_only_negative_voxels():
    activity = np.array([[-2.0, 0.0], [3.0, -0.5]], np.float32)
    clipped, count = quantitation.clip_negative(activity)
    np.testing.assert_array_equal(clipped, [[0.0, 0.0], [3.0, 0.0]])
    assert count == 2 and clipped.dtype == np.float32
    untouched, none = quantitation.clip_negative(clipped)
    assert none == 0 and untouched is clipped


def test_activity_change_against_the_input():
    source = np.array([1.0, 2.0, 7.0])
    output = np.array([0.0, 2.5, 7.7])  # total 10 → 10.2, max 7 → 7.7
    change = quantitation.activity_change(source, output, units="BQML", clipped_voxels=1)
    assert change.total_change == pytest.approx(0.02)
    assert change.max_change == pytest.approx(0.1)
    assert (
        change.summary() == "total +2.0 %, max +10.0 %, 1 voxels clipped to 0 (33.3 % of the scan)"
    )
    lower = quantitation.activity_change(source, source * 0.996)
    assert lower.summary() == "total −0.4 %, max −0.4 %"


def test_record_keeps_earlier_scans_and_replaces_a_rerun(tmp_path):
    first = quantitation.activity_change(np.ones(4), np.full(4, 1.1), units="SUVbw")
    second = quantitation.activity_change(np.ones(4), np.full(4, 0.9), units="SUVbw")
    quantitation.record_changes(tmp_path, {"a": first, "b": first})
    path = quantitation.record_changes(tmp_path, {"b": second})
    assert path == tmp_path / quantitation.RECORD_NAME
    records = json.loads(path.read_text())
    assert set(records) == {"a", "b"} and records["a"]["units"] == "SUVbw"
    assert records["a"]["total_change"] == pytest.approx(0.1)
    assert records["b"]["max_change"] == pytest.approx(-0.1)
    assert [p.name for p in tmp_path.iterdir()] == [quantitation.RECORD_NAME]


@pytest.mark.parametrize(
    ("units", "linear"),
    [
        ("BQML", True),
        ("kBq/mL", True),
        ("SUVbw", True),
        ("CNTS", True),
        ("MGMINML", False),
        ("1CM", False),
        ("PCNT", False),
        ("unknown", False),
        (None, False),
    ],
)
def test_activity_units_are_told_from_other_quantities(units, linear):
    assert is_activity_concentration(units) is linear
