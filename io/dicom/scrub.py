"""Free text from DICOM headers, scrubbed before it is stored anywhere: a vocabulary allow-list.

SeriesDescription, StudyDescription, ProtocolName and ContrastBolusAgent are typed by people, and
real archives carry names, dates and IDs in them ("DOE^JANE abd", "for Dr Smith", "PAT 12345678").
The selection rules (``io/selection_rules.json``) need the imaging words in them, so the text is
kept, but only word by word: :func:`scrub_text` splits the text into tokens (runs of letters and
digits, Unicode-aware) and keeps a token only if it is

* a word of :data:`VOCABULARY` (imaging, anatomy, phase and contrast words in the languages the
  rules know, contrast agent names, units), or a compound made only of such words ("portalvenös",
  "単純CT"), compared case-insensitively;
* a number of at most 4 digits ("2.5", "70s", "120 kV"), or a short code of letters and digits
  such as a kernel or a thickness ("Br40", "B30f", "FC03", "T20s", "5mm", "3D");
* a single letter ("C+", "w/o", "W/C").

Every other token becomes :data:`PLACEHOLDER` ("x": word characters, so the rules' word boundaries
fall where they fell in the original text).  Separators (spaces, ``/``, ``+``, ``^``, ``_``,
``-`` ...) are kept as they were.  What remains is a known risk and stated: a name that is itself
an imaging word ("Art", "Plain") survives, as do initials (single letters).
"""

from __future__ import annotations

import re

__all__ = ["PLACEHOLDER", "VOCABULARY", "scrub_text"]

PLACEHOLDER = "x"

_WORDS = """
abd abdo abdomen abdominal abdominale abdomino abdominopelvic addome addominale adrenal
angio angiography aorta aortic aortography art arterial arteriale arteriel arterielle arterial
arteriell arteriella arterielle arterio ax axi axial axiale baseline basal basale bauch becken
biphasic blanco body bolus bone brain breath buik caput care chest con contrast contraste
contrastado contrastada contrasto cor coronal coronale ct cta cte cholangio colon cuerpo
dect delay delayed diretta diretto direct dual dose dual early eindruck enhanced enhancement
equilibrium excretory exam fase fast fegato field flash foie helical hepatic hepatique high
hopital iv inj injected injection injecte injectee injectie inspiration kidney km kontrast
kontrastmittel late leber leer leeraufnahme liver low lung lungs mdc met mip minip mit monitoring
mpr nativ native nativo nativa nephro nephrographic neck non nc ncct oberbauch obl oblique ohne
pancreas pancreatic pancreatique pankreas pancreas pelvis pelvic pel phase plain planning portal
portale portaal portalvenos portalvenous portalvenös porto portovenous post pre precontrast
premonitoring primary protocol pv pvp recon reconstruction reformat reformatted renal rene
routine sag sagittal sans scan scanner scout screen secondary sem senza series sin smart soft
spc spiral standard std stomach superiore superior surview tac tc tdm temps thick thin thin
thorax topogram tpv triphasic unenhanced upper uro urography vaso ven vena venoso venosa veneus
venous venos venös venoso veineux veineuse volume vr vrt w wo with without zonder
abdomen blanco portal venöse venösen venös venöse spätphase arteriell ohne
localizer localiser scanogram pilot report capture patient key images info doseinfo
thick thin soft sharp bone lung detail edge ultra hd smooth ub ua fc br qr hr bl
omnipaque iomeron imeron visipaque ultravist isovue optiray xenetix telebrix iopamiro
none no nein geen ninguno aucun keine nil na applied oral rectal water
mm cm sec s kv kvp mas ma ms ax sl slice slices thickness kernel filter iterative
idose asir safire admire adaptive iter ir fbp dlr aidr
noncontrast noncon nonenhanced enhanced unenh wwo pre post
save pelvien pelvienne pelviennes abdominopelvienne thoracique thorax chest
for of the to in on at by from only all et and y e und og och avec sin con sans senza ohne zonder met mit sem bez utan
ab abd ap pa lt rt left right head neck body whole trunk
"""
# words of the rules' non-latin patterns and the phantom's study descriptions
_CJK = "腹部 単純 造影 門脈相 平衡相 平衡相前 動脈相 上腹部 平扫 增强 비조영 조영 門脈 相 前 ct"

#: Lower-case words kept verbatim by :func:`scrub_text`.
VOCABULARY: frozenset[str] = frozenset(_WORDS.split()) | frozenset(_CJK.split())

_TOKEN = re.compile(r"[^\W_]+")
_CODE = re.compile(r"^(?:\d{1,4}|[a-z]{1,3}\d{1,4}[a-z]{0,3}|\d{1,4}[a-z]{1,4})$")
_MAX_WORD = max(len(w) for w in VOCABULARY)


def _compound(tok: str) -> bool:
    """``tok`` (no digits) is a concatenation of vocabulary words of 2+ characters."""
    if len(tok) > 40 or any(c.isdigit() for c in tok):
        return False
    n = len(tok)
    ok = [True] + [False] * n
    for end in range(1, n + 1):
        for start in range(max(0, end - _MAX_WORD), end - 1):
            if ok[start] and tok[start:end] in VOCABULARY:
                ok[end] = True
                break
    return ok[n]


def _keep(tok: str) -> bool:
    low = tok.lower()
    return len(low) == 1 or low in VOCABULARY or _CODE.match(low) is not None or _compound(low)


def scrub_text(text: str | None) -> str | None:
    """``text`` with every token outside the vocabulary replaced by :data:`PLACEHOLDER`.

    ``None`` stays ``None``.  Deterministic; separators are kept, so the selection rules' regexes
    see the same word boundaries.  Examples: ``"DOE^JANE Abdomen nativ 2.5 Br40"`` ->
    ``"x^x Abdomen nativ 2.5 Br40"``; ``"Oberbauch portalvenös"`` is kept as it is.
    """
    if text is None:
        return None
    return _TOKEN.sub(lambda m: m.group(0) if _keep(m.group(0)) else PLACEHOLDER, text)
