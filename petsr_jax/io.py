"""Scan readers and writers (DICOM series, NIfTI): `read_volume`, `write_dicom`, `write_nifti`."""
