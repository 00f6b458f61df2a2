"""What a hospital's study looks like around the two phases: series descriptions in several styles
and languages, contrast-agent tags (sometimes missing or wrong), study descriptions, institutions.

All choices come from the caller's random generator, so a study's headers are deterministic.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LANGUAGES", "Naming", "draw_naming"]

# language -> (weight, SpecificCharacterSet, non-contrast phrases, portal-venous phrases, study)
LANGUAGES: dict[str, tuple[float, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "en": (
        0.42,
        "ISO_IR 100",
        (
            "NC ABDOMEN",
            "Abdomen w/o",
            "ABD WO",
            "Non-Con",
            "Pre-contrast",
            "PLAIN ABDOMEN",
            "Abd pre",
            "W/O CONTRAST",
            "Unenhanced",
        ),
        (
            "PV",
            "Portal venous",
            "ABD PV",
            "Abdomen w/",
            "C+ PV",
            "Post-contrast",
            "VENOUS",
            "Abd 70s",
        ),
        ("CT ABDOMEN", "CT ABD/PELVIS W/WO", "CT Pancreas protocol", "CT UPPER ABDOMEN"),
    ),
    "de": (
        0.20,
        "ISO_IR 100",
        ("ABD NATIV", "Abdomen nativ", "Oberbauch nativ", "NATIV"),
        ("Venös", "PV", "Abdomen KM venös", "Oberbauch portalvenös", "pv KM"),
        ("CT Abdomen", "CT Oberbauch", "Pankreas CT"),
    ),
    "fr": (
        0.10,
        "ISO_IR 100",
        ("ABDO SANS INJECTION", "sans injection", "ABDOMEN SPC", "SANS IV"),
        ("ABDO TPV", "AVEC INJECTION", "Temps portal", "ABDOMEN PORTAL"),
        ("TDM ABDOMINO-PELVIENNE", "SCANNER ABDOMEN"),
    ),
    "it": (
        0.10,
        "ISO_IR 100",
        ("ADDOME SENZA MDC", "senza mdc", "Diretta", "BASALE"),
        ("FASE VENOSA", "con mdc fase portale", "Portale", "VENOSA"),
        ("TC ADDOME", "TC ADDOME SUPERIORE CON MDC"),
    ),
    "es": (
        0.07,
        "ISO_IR 100",
        ("ABDOMEN SIN CONTRASTE", "Sin contraste", "Basal"),
        ("FASE PORTAL", "Con contraste portal", "Venosa"),
        ("TC ABDOMEN", "TAC ABDOMINAL"),
    ),
    "nl": (
        0.06,
        "ISO_IR 100",
        ("Blanco", "Buik blanco", "ZONDER CONTRAST"),
        ("Portaal veneus", "Buik PV", "MET CONTRAST"),
        ("CT BUIK", "CT Abdomen"),
    ),
    "ja": (
        0.05,
        "ISO_IR 192",
        ("腹部 単純", "単純", "単純CT"),
        ("門脈相", "腹部 造影 門脈相", "造影 平衡相前"),
        ("腹部CT", "上腹部 造影CT"),
    ),
}
_NEUTRAL = ("Abdomen", "ROUTINE ABD", "Body", "Abd/Pel", "Oberbauch", "AXIAL", "Standard")
_AGENTS = (
    "OMNIPAQUE 350",
    "Iomeron 400",
    "VISIPAQUE 320",
    "ULTRAVIST 370",
    "Imeron",
    "KM",
    "APPLIED",
    "CONTRAST",
)
_NONE_TAGS = ("NONE", "None", "no", "NO CONTRAST")
_LOCALIZER = {
    "GE MEDICAL SYSTEMS": "Scout",
    "SIEMENS": "Topogram  0.6  T20s",
    "Philips": "Surview",
    "TOSHIBA": "Scanogram",
    "UIH": "Localizer",
}
_SC = ("Dose Report", "Patient Protocol", "Screen Save", "Key Images", "DOSE INFO")
_REFORMAT = (
    "AX MPR {t:g}mm",
    "Thick Axial {t:g}",
    "MPR Ax {t:g}/{t:g}",
    "Ax {t:g}mm recon",
    "ABD AX {t:g}",
)
_INSTITUTIONS = (
    "PHANTOM GENERAL HOSPITAL",
    "Phantom University Medical Centre",
    "Klinikum Phantomstadt",
    "Hopital Fantome",
    "Ospedale Fantasma",
    "PHANTOM IMAGING CENTER",
)


class Naming:
    """The text of one study's headers (descriptions, tags, institution)."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)

    def as_truth(self) -> dict:
        return {
            "language": self.language,
            "nc_series_description": self.nc_desc,
            "pv_series_description": self.pv_desc,
            "nc_contrast_agent_tag": self.nc_agent or "",
            "pv_contrast_agent_tag": self.pv_agent or "",
        }


def _fmt(rng, phrase: str, *, manufacturer: str, thk: float, kernel: str) -> str:
    """Vendor-flavoured series description around a phrase."""
    k = kernel.split("\\")[0]
    style = int(rng.integers(4))
    if manufacturer == "SIEMENS" and style < 3:
        return f"{phrase} {thk:g} {k}"
    if manufacturer == "GE MEDICAL SYSTEMS" and style < 2:
        return f"{phrase} {thk:g}mm" if style else f"{thk:g}mm {k.title()} {phrase}"
    if manufacturer == "TOSHIBA" and style < 2:
        return f"{phrase}  {thk:g}  {k}"
    if style == 0:
        return phrase
    if style == 1:
        return f"{phrase} {thk:g}"
    if style == 2:
        return f"{phrase} {thk:g}mm"
    return phrase.upper()


def draw_naming(rng: np.random.Generator, *, manufacturer: str, thk: float, kernel: str) -> Naming:
    langs = list(LANGUAGES)
    w = np.array([LANGUAGES[x][0] for x in langs])
    lang = langs[int(rng.choice(len(langs), p=w / w.sum()))]
    _, charset, nc_ph, pv_ph, study_ph = LANGUAGES[lang]
    nc_phrase = nc_ph[int(rng.integers(len(nc_ph)))]
    pv_phrase = pv_ph[int(rng.integers(len(pv_ph)))]
    neutral_nc = rng.random() < 0.12  # description says nothing about the phase
    neutral_pv = rng.random() < 0.12
    if neutral_nc:
        nc_phrase = _NEUTRAL[int(rng.integers(len(_NEUTRAL)))]
    if neutral_pv:
        pv_phrase = _NEUTRAL[int(rng.integers(len(_NEUTRAL)))]
    nc_desc = _fmt(rng, nc_phrase, manufacturer=manufacturer, thk=thk, kernel=kernel)
    pv_desc = _fmt(rng, pv_phrase, manufacturer=manufacturer, thk=thk, kernel=kernel)
    r = rng.random()
    nc_agent = (
        None
        if r < 0.86
        else (
            _NONE_TAGS[int(rng.integers(len(_NONE_TAGS)))]
            if r < 0.95
            else _AGENTS[int(rng.integers(len(_AGENTS)))]
        )
    )
    pv_agent = _AGENTS[int(rng.integers(len(_AGENTS)))] if rng.random() < 0.7 else None
    ref_t = 5.0 if thk < 5 else 8.0
    return Naming(
        language=lang,
        charset=charset,
        nc_desc=nc_desc,
        pv_desc=pv_desc,
        nc_agent=nc_agent,
        pv_agent=pv_agent,
        study_desc=study_ph[int(rng.integers(len(study_ph)))],
        localizer_desc=_LOCALIZER.get(manufacturer, "Localizer"),
        sc_desc=_SC[int(rng.integers(len(_SC)))],
        reformat_desc=_REFORMAT[int(rng.integers(len(_REFORMAT)))].format(t=ref_t),
        reformat_thk=ref_t,
        institution=_INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))],
    )
