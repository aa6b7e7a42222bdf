"""`Volume`: what a notebook shows when it prints one."""

import numpy as np
import pydicom

from petsr_jax.volume import Volume


def _dicom_headers(count: int) -> list:
    headers = []
    for k in range(count):
        ds = pydicom.Dataset()
        ds.PatientID = "NEMA"
        ds.SeriesDescription = "PET brain " * 5
        for n in range(40):  # a real PET header holds hundreds of elements
            ds.add_new(pydicom.tag.Tag(0x0009, 0x1000 + n), "LO", f"private value {k}.{n}")
        headers.append(ds)
    return headers


def test_printing_a_dicom_volume_is_a_short_summary():
    volume = Volume(
        np.zeros((47, 128, 128), np.float32),
        spacing=(3.27, 2.03, 2.03),
        units="BQML",
        patient_id="NEMA",
        headers=_dicom_headers(47),
        meta={"source_path": "/data/nema/series1"},
    )
    text = repr(volume)
    assert str(volume) == text and len(text.splitlines()) <= 2 and len(text) < 300
    for fact in ("47×128×128", "3.27×2.03×2.03 mm", "BQML", "'NEMA'", "47 DICOM headers"):
        assert fact in text, fact
    assert "/data/nema/series1" in text and "private value" not in text


def test_a_volume_made_in_memory_says_so():
    text = repr(Volume(np.zeros((2, 4, 4)), spacing=(2.0, 1.0, 1.0)))
    assert "no headers" in text and "in memory" in text and "units unknown" in text
