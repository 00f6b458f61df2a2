"""Scanner vendors the phantom imitates: names, models, kernels and how each stores pixel values.

``storage`` says how HU become stored values: ``signed`` (PixelRepresentation 1) or unsigned,
``intercept``/``slope`` (RescaleIntercept/RescaleSlope), ``bits_stored``, the stored value outside
the reconstruction circle and whether a PixelPaddingValue tag announces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["VENDORS", "Vendor", "draw_vendor"]


@dataclass(frozen=True)
class Vendor:
    manufacturer: str
    models: tuple[str, ...]
    kernels: tuple[tuple[str, bool], ...]  # (name, sharp?)
    thicknesses: tuple[float, ...]  # slice thicknesses this vendor's protocols use (mm)
    signed: bool
    intercept: float
    slope: float
    bits_stored: int
    pad_stored: int  # stored value outside the field of view
    pad_tag: bool  # write PixelPaddingValue
    weight: float


VENDORS: tuple[Vendor, ...] = (
    Vendor(
        "GE MEDICAL SYSTEMS",
        ("LightSpeed VCT", "Discovery CT750 HD", "Revolution CT", "Optima CT660"),
        (("STANDARD", False), ("SOFT", False), ("DETAIL", True)),
        (0.625, 1.25, 2.5, 5.0),
        True,
        -1024.0,
        1.0,
        16,
        -2000,
        True,
        0.30,
    ),
    Vendor(
        "SIEMENS",
        ("SOMATOM Definition AS+", "SOMATOM Force", "SOMATOM go.Top", "Sensation 64"),
        (("B30f", False), ("B31f", False), ("Br40d", False), ("I30f\\3", False), ("B45f", True)),
        (1.0, 1.5, 2.0, 3.0, 5.0),
        False,
        -1024.0,
        1.0,
        12,
        0,
        False,
        0.30,
    ),
    Vendor(
        "Philips",
        ("iCT 256", "Brilliance 64", "IQon - Spectral CT", "Ingenuity CT"),
        (("B", False), ("C", True), ("UB", False)),
        (0.9, 1.0, 2.0, 3.0, 5.0),
        False,
        -1000.0,
        1.0,
        12,
        0,
        False,
        0.20,
    ),
    Vendor(
        "TOSHIBA",
        ("Aquilion ONE", "Aquilion PRIME", "Aquilion Lightning"),
        (("FC08", False), ("FC18", False), ("FC03", True)),
        (1.0, 2.0, 3.0, 5.0),
        True,
        0.0,
        1.0,
        16,
        -2000,
        False,
        0.15,
    ),
    Vendor(
        "UIH",
        ("uCT 760", "uCT 960+"),
        (("B_SOFT_B", False), ("B_SHARP_C", True)),
        (1.0, 2.0, 3.0, 5.0),
        True,
        -1024.0,
        0.5,
        16,
        -2048,
        True,
        0.05,
    ),
)


def draw_vendor(rng: np.random.Generator) -> Vendor:
    w = np.array([v.weight for v in VENDORS])
    return VENDORS[int(rng.choice(len(VENDORS), p=w / w.sum()))]
