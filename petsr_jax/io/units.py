"""Physical units: what a DICOM header's Units mean, how a volume's units are stored back, and
the body-weight SUV conversion.

`read_volume(..., units="SUVbw")` converts Bq/mL to body-weight SUV:

    SUVbw = C [Bq/mL] × PatientWeight [kg] × 1000 [g/kg] / D [Bq]
    D = RadionuclideTotalDose × 2 ** (-(t_scan - t_injection) / RadionuclideHalfLife)

with `t_injection` = RadiopharmaceuticalStartDateTime (or RadiopharmaceuticalStartTime on the
series date) and `t_scan` = SeriesDate/SeriesTime, or the earliest AcquisitionDate/Time when the
series time is missing or later (some consoles reset it on post-processing). This is the decay
of the dose to the time the images are decay corrected to, so it applies when DecayCorrection is
START; with ADMIN the images are already corrected to the injection time and `D` is the injected
dose itself. The factor `PatientWeight × 1000 / D` is kept in `Volume.meta["suv_factor"]`
whenever the header allows it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from petsr_jax.io.errors import ScanError
from petsr_jax.volume import Volume

# Defined terms of PET Units (0054,1001); anything else cannot be written to a valid PET series.
_DICOM_UNITS = frozenset(
    "CNTS NONE CM2 CM2ML PCNT CPS BQML MGMINML UMOLMINML MLMGM MLG 1CM UMOLML PROPCNTS PROPCPS "
    "MLMINML MLML GML STDDEV".split()
)


def units_from_dicom(header: Dataset) -> str:
    units = str(header.get("Units", "") or "").strip()
    # The writer stores "unknown" as NONE, the only Units term that claims no physical unit.
    if units in ("", "NONE"):
        return "unknown"
    if units == "GML" and str(header.get("SUVType", "BW") or "BW") == "BW":
        return "SUVbw"
    return units


def dicom_units(units: str) -> tuple[str, str | None]:
    """(Units, SUVType) for a volume's units: 'SUVbw' is stored as g/mL with SUV type BW."""
    if units == "SUVbw":
        return "GML", "BW"
    if units == "unknown":
        return "NONE", None
    if units not in _DICOM_UNITS:
        raise ScanError(
            f"units {units!r} have no DICOM PET Units term; expected 'SUVbw', 'unknown' or one "
            f"of {sorted(_DICOM_UNITS)}"
        )
    return units, None


def _required(dataset: Dataset, keyword: str, source, context: str = "") -> object:
    value = dataset.get(keyword)
    if value is None or value == "":
        where = f" in {context}" if context else ""
        raise ScanError(f"{source}: SUVbw needs {keyword}{where}, which is missing")
    return value


def _parsed(parse, value, keyword: str, source):
    """A DICOM DA/TM/DT value as a datetime object, or a ScanError naming the attribute."""
    try:
        return parse(str(value))
    except ValueError as error:
        raise ScanError(f"{source}: {keyword} {value!r} is not a valid DICOM date/time") from error


def _datetime(header: Dataset, date_keyword: str, time_keyword: str, source):
    date, time = header.get(date_keyword), header.get(time_keyword)
    if not date or not time:
        return None
    return datetime.datetime.combine(
        _parsed(DA, date, date_keyword, source), _parsed(TM, time, time_keyword, source)
    )


def suv_bw_factor(headers: Sequence[Dataset], source) -> float:
    """`PatientWeight × 1000 / decayed dose` in g/Bq (see the module docstring)."""
    first = headers[0]
    if units_from_dicom(first) != "BQML":
        raise ScanError(
            f"{source}: SUVbw needs activity concentrations (Units BQML), the series has Units "
            f"{first.get('Units', 'missing')!r}"
        )
    weight_kg = float(_required(first, "PatientWeight", source))
    sequence = _required(first, "RadiopharmaceuticalInformationSequence", source)
    if len(sequence) == 0:
        raise ScanError(
            f"{source}: SUVbw needs RadiopharmaceuticalInformationSequence, it is empty"
        )
    isotope = sequence[0]
    context = "RadiopharmaceuticalInformationSequence"
    dose_bq = float(_required(isotope, "RadionuclideTotalDose", source, context))
    half_life_s = float(_required(isotope, "RadionuclideHalfLife", source, context))
    decay_correction = str(_required(first, "DecayCorrection", source)).upper()
    if weight_kg <= 0 or dose_bq <= 0 or half_life_s <= 0:
        raise ScanError(
            f"{source}: SUVbw needs positive PatientWeight, RadionuclideTotalDose and "
            f"RadionuclideHalfLife; found {weight_kg}, {dose_bq}, {half_life_s}"
        )
    if decay_correction == "ADMIN":
        return weight_kg * 1000.0 / dose_bq
    if decay_correction != "START":
        raise ScanError(
            f"{source}: SUVbw is defined here for DecayCorrection START or ADMIN, the series has "
            f"{decay_correction!r} (images not decay corrected)"
        )
    acquisitions = [
        moment
        for header in headers
        if (moment := _datetime(header, "AcquisitionDate", "AcquisitionTime", source))
    ]
    scan_start = _datetime(first, "SeriesDate", "SeriesTime", source)
    if acquisitions and (scan_start is None or scan_start > min(acquisitions)):
        scan_start = min(acquisitions)
    if scan_start is None:
        raise ScanError(
            f"{source}: SUVbw needs SeriesDate/SeriesTime or AcquisitionDate/AcquisitionTime, "
            "which are missing"
        )
    if isotope.get("RadiopharmaceuticalStartDateTime"):
        injection = _parsed(
            DT, isotope.RadiopharmaceuticalStartDateTime, "RadiopharmaceuticalStartDateTime", source
        )
    else:
        start_time = _required(isotope, "RadiopharmaceuticalStartTime", source, context)
        injection = datetime.datetime.combine(
            scan_start.date(), _parsed(TM, start_time, "RadiopharmaceuticalStartTime", source)
        )
        if injection > scan_start:  # injected before midnight, scanned after
            injection -= datetime.timedelta(days=1)
    # Scanner clocks rarely carry a time zone; compare wall-clock times.
    injection = injection.replace(tzinfo=None)
    delay_s = (scan_start.replace(tzinfo=None) - injection).total_seconds()
    if delay_s < 0:
        raise ScanError(
            f"{source}: injection time {injection} is after the scan start {scan_start}"
        )
    decayed_dose_bq = dose_bq * 2.0 ** (-delay_s / half_life_s)
    return weight_kg * 1000.0 / decayed_dose_bq


def convert_units(volume: Volume, units: str | None, source: Path) -> Volume:
    if units is None or units == volume.units:
        return volume
    if units != "SUVbw":
        raise ScanError(
            f"{source}: cannot convert units {volume.units!r} to {units!r}; "
            "units must be None (keep) or 'SUVbw'"
        )
    if volume.headers is None:
        raise ScanError(
            f"{source}: SUVbw needs the DICOM patient weight and dose; this source has no DICOM "
            f"header and its units are {volume.units!r}"
        )
    factor = suv_bw_factor(volume.headers, source)
    return volume.replace(
        data=volume.data * np.float32(factor),
        units="SUVbw",
        meta={**volume.meta, "suv_factor": factor},
    )


# Units that are the tracer's activity concentration times a constant of the scan (calibration,
# body weight / dose for SUV, frame duration for counts): per-volume normalisation makes any two
# of them give the same network input. Parametric maps (MGMINML, MLMINML...), attenuation (1CM)
# and relative units (PCNT, STDDEV) hold another quantity. Compared without case, "/" or spaces.
_ACTIVITY_UNITS = frozenset(
    {"BQML", "KBQML", "MBQML", "SUVBW", "GML", "CNTS", "CPS", "PROPCNTS", "PROPCPS"}
)


def is_activity_concentration(units: str | None) -> bool:
    """Whether `units` are a constant multiple of activity concentration (Bq/mL, kBq/mL, SUV,
    counts): a change among them is linear and leaves a normalised image unchanged."""
    spelled = str(units or "").replace("/", "").replace(" ", "").upper()
    return spelled in _ACTIVITY_UNITS
