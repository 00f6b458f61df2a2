"""DICOM: header scan, slice read and pixel decode (no image math)."""
