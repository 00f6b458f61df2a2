"""A second, deliberately different CT study renderer for robustness tests (issue 12).

Training never uses it and the shipped package never imports it.  See ``anatomy.py`` (shapes,
habitus, positions), ``render.py`` (HU calibration, slab, blur, noise spectrum, d'), ``archive.py``
(DICOM archives in the phantom layout), ``measure.py`` (the assessment) and ``RESULTS.md``.
"""
