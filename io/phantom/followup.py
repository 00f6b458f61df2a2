"""Follow-up studies of one phantom subject: the same anatomy months to years apart.

A :class:`Visit` changes a subject drawn by :func:`pdacscreen.io.phantom.subject.make_subject`
after its anatomy is drawn: the lesion (drawn at its final size) is scaled or absent, the body wall
muscle and subcutaneous fat thin (sarcopenia, weight loss), the gland shrinks (atrophy).  Every
other shape, the tissue values and the findings' positions stay the subject's; the acquisition
(scanner, grid, table position) and the noise are drawn again per visit, as in a real archive.

:func:`follow_up_course` gives a patient's visits for two courses: ``"progressor"`` (no lesion at
first, a small PDAC later that grows; gland and muscle loss) and ``"stable"`` (no lesion; slow
ageing changes only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pdacscreen.io.errors import InputError
from pdacscreen.io.phantom.anatomy import Anatomy, Findings
from pdacscreen.io.phantom.shapes import Tube

__all__ = ["COURSES", "Visit", "follow_up_course"]

COURSES = ("progressor", "stable")
_VISIT_SALT = 0x56495354  # "VIST"


@dataclass(frozen=True)
class Visit:
    """One study of a subject.

    Attributes:
        index: visit number (0 = the subject's own acquisition; others draw a new scanner/noise).
        months: time since the first visit, months (reported in truth, no effect on the image).
        lesion_scale: lesion diameter relative to the subject's drawn lesion (0 = absent).
        muscle_scale: body-wall muscle thickness relative to the subject's.
        fat_scale: subcutaneous fat thickness relative to the subject's.
        pancreas_scale: gland radius relative to the subject's (volume scales about as its square).
    """

    index: int = 0
    months: float = 0.0
    lesion_scale: float = 1.0
    muscle_scale: float = 1.0
    fat_scale: float = 1.0
    pancreas_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.index, (int, np.integer)) or self.index < 0:
            raise InputError(f"Visit.index must be >= 0, got {self.index!r}", code="bad_visit")
        for name in ("lesion_scale", "muscle_scale", "fat_scale", "pancreas_scale"):
            v = float(getattr(self, name))
            lo = 0.0 if name == "lesion_scale" else 0.3
            if not (np.isfinite(v) and lo <= v <= 2.0):
                raise InputError(f"Visit.{name} must be in [{lo}, 2], got {v!r}", code="bad_visit")

    def streams(self, seed: int, qr: np.random.Generator, nr: np.random.Generator):
        """Acquisition and noise streams: the subject's own for visit 0, fresh ones otherwise."""
        if self.index == 0:
            return qr, nr
        ss = np.random.SeedSequence([_VISIT_SALT, int(seed), int(self.index)]).spawn(2)
        return np.random.default_rng(ss[0]), np.random.default_rng(ss[1])

    def apply(self, an: Anatomy, findings: Findings) -> tuple[Anatomy, Findings]:
        """The visit's anatomy and findings (new objects; ``an`` is not changed)."""
        kw: dict = {
            "muscle_mm": an.muscle_mm * self.muscle_scale,
            "fat_mm": an.fat_mm * self.fat_scale,
        }
        if self.pancreas_scale != 1.0:
            p = an.pancreas
            kw["pancreas"] = Tube(p.points, p.radii * self.pancreas_scale, z_scale=p.z_scale)
        les = an.lesion
        if les is not None and self.lesion_scale == 0.0:
            kw.update(lesion=None, atrophy_t=None)
            d = an.duct
            kw["duct"] = Tube(d.points, np.minimum(d.radii, 1.2), z_scale=d.z_scale)
            findings = dataclasses.replace(
                findings,
                lesion_type="none",
                lesion_diameter_mm=0.0,
                lesion_location="",
                duct_dilated=False,
                atrophy=False,
            )
        elif les is not None and self.lesion_scale != 1.0:
            semi = tuple(s * self.lesion_scale for s in les.semi)
            kw["lesion"] = dataclasses.replace(les, semi=semi)
            findings = dataclasses.replace(
                findings, lesion_diameter_mm=findings.lesion_diameter_mm * self.lesion_scale
            )
        return dataclasses.replace(an, **kw), findings


def follow_up_course(course: str, months: tuple[float, ...] = (0.0, 12.0, 24.0)) -> list[Visit]:
    """Visits of one patient at ``months`` (ascending, first 0) for ``course``.

    ``"progressor"``: no lesion until the middle of the span, then a PDAC growing to its drawn size
    at the last visit; pancreas radius -6 %/year (about -12 %/year volume), wall muscle
    -15 %/year (cachexia).
    ``"stable"``: no change in the lesion (use it with a subject without one), -1 %/year muscle.
    Use ``lesion_type="pdac"`` for a progressor and ``"none"`` for a stable subject.
    """
    if course not in COURSES:
        raise InputError(f"course must be one of {COURSES}, got {course!r}", code="bad_course")
    ms = [float(m) for m in months]
    if not ms or ms[0] != 0.0 or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise InputError(f"months must ascend from 0, got {months!r}", code="bad_course")
    span = max(ms[-1], 1e-9)
    visits = []
    for i, m in enumerate(ms):
        years = m / 12.0
        if course == "progressor":
            frac = (m / span - 0.5) / 0.5  # 0 at half the span, 1 at the end
            lesion = 1.0 if len(ms) == 1 else (0.0 if frac <= 0 else max(0.35, frac))
            visits.append(
                Visit(
                    index=i,
                    months=m,
                    lesion_scale=float(min(lesion, 1.0)),
                    muscle_scale=float(0.85**years),
                    fat_scale=float(0.9**years),
                    pancreas_scale=float(0.94**years),
                )
            )
        else:
            visits.append(Visit(index=i, months=m, muscle_scale=float(0.99**years)))
    return visits
