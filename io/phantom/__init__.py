"""The phantom archive generator: synthetic abdominal CT subjects, their DICOM studies and truth."""
