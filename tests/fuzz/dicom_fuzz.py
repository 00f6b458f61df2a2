"""A seeded mutation fuzzer for pdacscreen's DICOM ingest (header read, decode, series load).

No external fuzzing engine: :func:`mutate_file` draws one of :data:`FILE_MUTATORS` from a seeded
``numpy`` generator and applies it to the bytes of an intact seed file (phantom series written by
``tests/ingest_synth.py`` in native, RLE, JPEG-LS and JPEG 2000 encodings, plus the real CT
fixtures in ``../shared/fixtures/real-ct`` when present); :data:`SERIES_MUTATORS` edit one slice
of an intact series.  The same seed gives the same files, so any finding replays.

Every mutated file goes through ``header_row`` (the indexer's read) and ``read_slice`` (the
decoder); every mutated series folder through ``load_series``.  They run in a worker process
(:class:`Sandbox`) with an address-space limit (:data:`MEMORY_LIMIT_BYTES`) and a per-call time
budget: a worker that hangs is killed and replaced, one that dies is replaced, and both are
findings, as are a ``MemoryError`` (an allocation beyond the bound) and any exception that is not a
typed :class:`~pdacscreen.io.errors.PdacscreenError`.  Outcomes are ``ok`` or an
:class:`~pdacscreen.io.errors.ErrorCode` value.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import struct
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

#: Address-space limit of the worker process (the bound no call may exceed).
MEMORY_LIMIT_BYTES = 3 * 1024**3
#: Wall-clock budget of one call (header read, decode or series load), seconds.
TIME_BUDGET_S = 20.0
KEY = b"fuzz-campaign-key-0123456789"
#: Outcomes that are findings (bugs): anything else is ``ok`` or an ErrorCode value.
FINDINGS = ("crash", "died", "memory")
#: A call over its budget is killed and recorded with this code (the worker is replaced).
HANG = "decode_timeout"

# --- seeds -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes


def phantom_seeds(workdir: Path) -> tuple[list[Seed], dict[str, list[Path]]]:
    """Intact phantom files (one series per encoding) and the series folders they came from."""
    from ingest_synth import write_series
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    seeds, series = [], {}
    for ts in ("native", RLELossless, JPEGLSLossless, JPEG2000Lossless):
        name = "native" if ts == "native" else pydicom.uid.UID(ts).keyword
        kw = {} if ts == "native" else {"transfer_syntax": ts}
        files = write_series(
            workdir / "seeds" / name, name=name, study="fuzz", n=8, rows=32, cols=32, **kw
        )
        series[name] = files
        seeds += [Seed(f"{name}/{f.name}", f.read_bytes()) for f in files[:3]]
    ds = pydicom.dcmread(series["native"][0])
    implicit = workdir / "seeds" / "implicit.dcm"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(implicit, implicit_vr=True, little_endian=True)
    seeds.append(Seed("implicit", implicit.read_bytes()))
    return seeds, series


def real_seeds(real_ct: Path | None) -> tuple[list[Seed], list[Path]]:
    """Real CT files (every codec of ``codecs/``) and the real GE series, if the fixtures exist."""
    if real_ct is None or not real_ct.is_dir():
        return [], []
    seeds = [
        Seed(f"real/{p.name[:60]}", p.read_bytes()) for p in sorted(real_ct.glob("codecs/*.dcm"))
    ]
    ge = sorted((real_ct / "dcm_qa_ct" / "In" / "GE").glob("*.dcm"))
    seeds += [Seed(f"real/GE/{p.name}", p.read_bytes()) for p in ge[:2]]
    return seeds, ge


# --- element walking ---------------------------------------------------------------------------

_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass(frozen=True)
class Element:
    start: int  # offset of the tag
    value: int  # offset of the value
    length: int  # value length (0xFFFFFFFF: undefined)
    tag: int
    vr: bytes | None  # None when implicit
    len_at: int  # offset of the length field
    len_size: int  # 2 or 4


def elements(data: bytes) -> list[Element]:
    """Top-level elements (file meta and dataset) of a little-endian file; stops where it cannot
    go on (an undefined-length sequence, a short file)."""
    out: list[Element] = []
    if len(data) < 132 or data[128:132] != b"DICM":
        return out
    off, implicit = 132, False
    try:
        while off + 8 <= len(data):
            g, e = struct.unpack_from("<HH", data, off)
            if g != 2 and out and out[-1].tag >> 16 == 2:  # first element after the file meta
                ts = next((x for x in out if x.tag == 0x00020010), None)
                raw = data[ts.value : ts.value + ts.length] if ts else b""
                implicit = raw.rstrip(b"\0 ") == b"1.2.840.10008.1.2"
            vr = None if (implicit and g != 2) else bytes(data[off + 4 : off + 6])
            if vr is None:
                len_at, size, hdr = off + 4, 4, 8
            elif vr in _LONG:
                len_at, size, hdr = off + 8, 4, 12
            else:
                len_at, size, hdr = off + 6, 2, 8
            length = struct.unpack_from("<I" if size == 4 else "<H", data, len_at)[0]
            out.append(Element(off, off + hdr, length, g << 16 | e, vr, len_at, size))
            if length == 0xFFFFFFFF:
                break
            off += hdr + length
    except struct.error:
        pass
    return out


# --- file mutators: bytes -> bytes ------------------------------------------------------------

Rng = np.random.Generator


def _pick(rng: Rng, seq):
    return seq[int(rng.integers(len(seq)))]


def m_byte_flip(data: bytes, rng: Rng) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 17))):
        i = int(rng.integers(128, len(b)))
        b[i] ^= 1 << int(rng.integers(8))
    return bytes(b)


def m_byte_flip_header(data: bytes, rng: Rng) -> bytes:
    """Flips inside the header only (where the parser's decisions are)."""
    els = elements(data)
    end = next((e.start for e in els if e.tag == 0x7FE00010), min(len(data), 2048))
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        b[int(rng.integers(128, max(129, end)))] = int(rng.integers(256))
    return bytes(b)


def m_truncate_at_element(data: bytes, rng: Rng) -> bytes:
    els = elements(data)
    cuts = [e.start for e in els] + [e.value for e in els] + [e.len_at + 1 for e in els]
    if not cuts:
        return data[: int(rng.integers(0, len(data)))]
    return data[: _pick(rng, cuts)]


def m_truncate_anywhere(data: bytes, rng: Rng) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def m_length_field(data: bytes, rng: Rng) -> bytes:
    """One element's length set huge, odd, zero or off by a little."""
    els = [e for e in elements(data) if e.length != 0xFFFFFFFF]
    if not els:
        return m_byte_flip(data, rng)
    e = _pick(rng, els)
    top = 0xFFFF if e.len_size == 2 else 0xFFFFFFFE
    new = _pick(
        rng, [top, top - 1, e.length + 1, max(0, e.length - 1), 0, e.length * 2 + 7, 0xFFFFFFFF]
    )
    new = min(new, 0xFFFF) if e.len_size == 2 else min(new, 0xFFFFFFFF)
    b = bytearray(data)
    struct.pack_into("<H" if e.len_size == 2 else "<I", b, e.len_at, new)
    return bytes(b)


def _nested(depth: int, *, implicit: bool, defined: bool) -> bytes:
    """A RequestAttributesSequence nested ``depth`` levels (pydicom #2330: ~250 -> RecursionError)."""
    tag = struct.pack("<HH", 0x0040, 0x0275)
    item_end = b"\xfe\xff\x0d\xe0\0\0\0\0"
    seq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"
    inner = b""
    for _ in range(depth):
        if defined:
            item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(inner)) + inner
            hdr = tag + (b"" if implicit else b"SQ\0\0") + struct.pack("<I", len(item))
            inner = hdr + item
        else:
            item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + item_end
            inner = tag + (b"" if implicit else b"SQ\0\0") + b"\xff\xff\xff\xff" + item + seq_end
    return inner


def m_deep_sequence(data: bytes, rng: Rng) -> bytes:
    els = elements(data)
    pix = next((e for e in els if e.tag == 0x7FE00010), None)
    if pix is None:
        return m_byte_flip(data, rng)
    implicit = pix.vr is None
    depth = int(_pick(rng, [20, 120, 250, 400, 1200]))
    blob = _nested(depth, implicit=implicit, defined=bool(rng.integers(2)))
    return data[: pix.start] + blob + data[pix.start :]


_VRS = [
    b"US",
    b"SS",
    b"UL",
    b"FD",
    b"FL",
    b"DS",
    b"IS",
    b"OB",
    b"OW",
    b"SQ",
    b"UN",
    b"UT",
    b"PN",
    b"LO",
    b"CS",
    b"AT",
    b"ZZ",
    b"us",
    b"\0\0",
    b"\xff\xff",
]


def m_wrong_vr(data: bytes, rng: Rng) -> bytes:
    els = [e for e in elements(data) if e.vr is not None and e.tag >> 16 != 2]
    if not els:
        return m_byte_flip(data, rng)
    e = _pick(rng, els)
    b = bytearray(data)
    b[e.start + 4 : e.start + 6] = _pick(rng, _VRS)
    return bytes(b)


def _rewrite(data: bytes, edit: Callable[[pydicom.Dataset], None]) -> bytes:
    from io import BytesIO

    ds = pydicom.dcmread(BytesIO(data))
    edit(ds)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


_ABSURD = {
    "Rows": [0, 1, 2, 65535],
    "Columns": [0, 1, 3, 65535],
    "BitsAllocated": [0, 1, 7, 12, 32, 64, 255],
    "BitsStored": [0, 17, 40, 65535],
    "HighBit": [0, 31, 65535],
    "NumberOfFrames": ["0", "-1", "2", "2147483647", "abc"],
    "SamplesPerPixel": [0, 3, 65535],
    "PixelRepresentation": [0, 1, 7],
    "PhotometricInterpretation": ["RGB", "PALETTE COLOR", "", "YBR_FULL"],
    "PlanarConfiguration": [1, 7],
}


def m_absurd_pixel_module(data: bytes, rng: Rng) -> bytes:
    kw = _pick(rng, list(_ABSURD))
    value = _pick(rng, _ABSURD[kw])

    def edit(ds):
        if kw == "NumberOfFrames":
            ds.add_new(0x00280008, "IS", value)
        else:
            setattr(ds, kw, value)

    return _rewrite(data, edit)


def m_pixel_data_size(data: bytes, rng: Rng) -> bytes:
    """Empty, short, odd or doubled PixelData (header lengths kept consistent)."""
    choice = int(rng.integers(4))

    def edit(ds):
        px = ds.PixelData
        ds.PixelData = [b"", px[: len(px) // 2], px[:-1] + b"", px + px][choice]

    return _rewrite(data, edit)


_TS = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.100",
    "1.2.3.4.5.6",
    "",
]


def m_transfer_syntax(data: bytes, rng: Rng) -> bytes:
    """The file meta's TransferSyntaxUID replaced (the data keep their real encoding)."""
    els = elements(data)
    ts = next((e for e in els if e.tag == 0x00020010), None)
    if ts is None:
        return m_byte_flip(data, rng)
    new = _pick(rng, _TS).encode()
    if len(new) % 2:
        new += b"\0"
    hdr = data[ts.start : ts.start + 6] + struct.pack("<H", len(new))
    out = data[: ts.start] + hdr + new + data[ts.value + ts.length :]
    # fix the group length (0002,0000) if present
    gl = next((e for e in els if e.tag == 0x00020000), None)
    if gl is not None:
        b = bytearray(out)
        old = struct.unpack_from("<I", b, gl.value)[0]
        struct.pack_into("<I", b, gl.value, max(0, old + len(new) - ts.length))
        out = bytes(b)
    return out


def _fragments(data: bytes) -> tuple[int, list[tuple[int, int]]] | None:
    """(offset of the pixel value, [(item offset, item length), ...]) of encapsulated data."""
    pix = next((e for e in elements(data) if e.tag == 0x7FE00010), None)
    if pix is None or pix.length != 0xFFFFFFFF:
        return None
    off, items = pix.value, []
    while off + 8 <= len(data):
        tag, length = struct.unpack_from("<II", data, off)
        if tag != 0xE000FFFE:
            break
        items.append((off, length))
        off += 8 + length
    return pix.value, items


def m_broken_fragments(data: bytes, rng: Rng) -> bytes:
    fr = _fragments(data)
    if fr is None or len(fr[1]) < 2:
        return m_pixel_data_size(data, rng)
    _, items = fr
    b = bytearray(data)
    k = int(rng.integers(5))
    off, length = _pick(rng, items[1:])
    if k == 0:  # fragment length beyond the file
        struct.pack_into("<I", b, off + 4, 0xFFFFFFF0)
    elif k == 1:  # item tag destroyed
        b[off : off + 4] = b"\x00\x00\x00\x00"
    elif k == 2:  # basic offset table pointing nowhere
        bot_off, bot_len = items[0]
        b[bot_off + 4 : bot_off + 8] = struct.pack("<I", 4)
        b[bot_off + 8 : bot_off + 8] = struct.pack("<I", 0x7FFFFFFF)
    elif k == 3:  # the sequence delimiter removed
        return data[:-8]
    else:  # a fragment cut in half, lengths kept
        struct.pack_into("<I", b, off + 4, length // 2)
    return bytes(b)


def m_codestream_markers(data: bytes, rng: Rng) -> bytes:
    """JPEG / JPEG-LS / JPEG 2000 markers (0xFF xx) inside the fragments corrupted: SOF/SIZ
    dimensions, marker codes, EOI removed."""
    fr = _fragments(data)
    if fr is None or len(fr[1]) < 2:
        return m_byte_flip(data, rng)
    _, items = fr
    off, length = items[1]
    start, end = off + 8, off + 8 + length
    b = bytearray(data)
    markers = [i for i in range(start, end - 1) if b[i] == 0xFF and b[i + 1] not in (0x00, 0xFF)]
    for _ in range(int(rng.integers(1, 4))):
        if not markers:
            break
        i = _pick(rng, markers)
        k = int(rng.integers(4))
        if k == 0:
            b[i + 1] = int(rng.integers(0xC0, 0x100))  # another marker code
        elif k == 1 and i + 9 < end:
            b[i + 5 : i + 9] = b"\xff\xff\xff\xff"  # SOF / SIZ sizes huge
        elif k == 2 and i + 4 < end:
            b[i + 2 : i + 4] = b"\xff\xff"  # segment length huge
        else:
            b[i] = 0x00
    if rng.integers(4) == 0:  # EOI / EOC gone
        b[end - 2 : end] = b"\0\0"
    return bytes(b)


FILE_MUTATORS: dict[str, Callable[[bytes, Rng], bytes]] = {
    "byte_flip": m_byte_flip,
    "byte_flip_header": m_byte_flip_header,
    "truncate_at_element": m_truncate_at_element,
    "truncate_anywhere": m_truncate_anywhere,
    "length_field": m_length_field,
    "deep_sequence": m_deep_sequence,
    "wrong_vr": m_wrong_vr,
    "absurd_pixel_module": m_absurd_pixel_module,
    "pixel_data_size": m_pixel_data_size,
    "transfer_syntax": m_transfer_syntax,
    "broken_fragments": m_broken_fragments,
    "codestream_markers": m_codestream_markers,
}


def mutate_file(seed: Seed, rng: Rng) -> tuple[str, bytes]:
    name = _pick(rng, list(FILE_MUTATORS))
    try:
        return name, FILE_MUTATORS[name](seed.data, rng)
    except Exception:  # noqa: BLE001 - a mutator that cannot apply falls back to flips
        return name + "(fallback)", m_byte_flip(seed.data, rng)


# --- series mutators: edit one slice of a series folder ---------------------------------------

_SERIES_EDITS: dict[str, Callable[[pydicom.Dataset, Rng], None]] = {
    "ipp_nan": lambda ds, r: setattr(ds, "ImagePositionPatient", ["nan", "0", "0"]),
    "ipp_far": lambda ds, r: setattr(ds, "ImagePositionPatient", [0, 0, _pick(r, [1e12, 7.3e7])]),
    "ipp_two_values": lambda ds, r: setattr(ds, "ImagePositionPatient", [0, 0]),
    "iop_zero": lambda ds, r: setattr(ds, "ImageOrientationPatient", [0] * 6),
    "iop_skew": lambda ds, r: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.3, 0.95, 0]),
    "spacing_zero": lambda ds, r: setattr(ds, "PixelSpacing", [_pick(r, [0, -1, "nan"]), 0.8]),
    "slope_zero": lambda ds, r: setattr(ds, "RescaleSlope", _pick(r, [0, "nan", "inf"])),
    "bits_allocated": lambda ds, r: setattr(ds, "BitsAllocated", _pick(r, [8, 32])),
    "pixel_representation": lambda ds, r: setattr(ds, "PixelRepresentation", 0),
    "other_study": lambda ds, r: setattr(ds, "StudyInstanceUID", "1.2.826.0.1.3680043.8.498.9"),
    "rows": lambda ds, r: setattr(ds, "Rows", _pick(r, [16, 64])),
}


def mutate_series(files: list[Path], out: Path, rng: Rng) -> str:
    """Copy a series to ``out`` with one slice edited (or one file mutated as bytes)."""
    out.mkdir(parents=True)
    for f in files:
        shutil.copy(f, out / f.name)
    victim = out / _pick(rng, files).name
    if rng.integers(3) == 0:
        name, data = mutate_file(Seed(victim.name, victim.read_bytes()), rng)
        victim.write_bytes(data)
        return "file:" + name
    if rng.integers(8) == 0:  # two slices only
        for f in sorted(out.iterdir())[2:]:
            f.unlink()
        return "two_slices"
    name = _pick(rng, list(_SERIES_EDITS))
    ds = pydicom.dcmread(victim)
    _SERIES_EDITS[name](ds, rng)
    ds.save_as(victim, enforce_file_format=False)
    return name


# --- the sandbox ------------------------------------------------------------------------------


def _serve(conn) -> None:  # pragma: no cover - runs in the worker process
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    import logging
    import warnings

    warnings.simplefilter("ignore")  # pydicom warns on every malformed value: thousands of lines
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    from pdacscreen.io.dicom.read import header_row, read_slice
    from pdacscreen.io.errors import PdacscreenError
    from pdacscreen.io.volume import load_series

    while True:
        try:
            kind, arg = conn.recv()
        except EOFError:
            return
        try:
            if kind == "header":
                row = header_row(arg, key=KEY)
                msg = row["error_message"] or ""
                if "MemoryError" in msg:  # caught as "unreadable", but an allocation too large
                    res = ("memory", msg[:300])
                else:
                    res = ("ok" if row["status"] == "ok" else row["error_code"], msg[:200])
            elif kind == "decode":
                read_slice(arg, key=KEY)
                res = ("ok", "")
            else:
                vol = load_series(arg, key=KEY, workers=1)
                res = ("ok", f"shape {vol.shape} flags {list(vol.flags)}")
        except PdacscreenError as e:
            cause, chain = e, []
            while cause is not None:
                chain.append(type(cause).__name__)
                cause = cause.__cause__
            bad = {"MemoryError", "RecursionError"} & set(chain)  # wrapped, but still findings
            res = ("memory" if "MemoryError" in bad else str(e.code), str(e)[:200])
        except MemoryError:
            res = ("memory", traceback.format_exc()[-600:])
        except BaseException:  # noqa: BLE001 - the finding itself
            res = ("crash", traceback.format_exc()[-1500:])
        conn.send(res)


class Sandbox:
    """One worker process; :meth:`call` returns (outcome, detail) within the time budget."""

    def __init__(self, budget_s: float = TIME_BUDGET_S) -> None:
        self.budget_s = budget_s
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _restart(self) -> None:
        self.restarts += 1
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self._start()

    def call(self, kind: str, arg) -> tuple[str, str]:
        self.conn.send((kind, arg))
        if not self.conn.poll(self.budget_s):
            self._restart()
            return HANG, f"killed: no answer within {self.budget_s:g} s"
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode if self.proc.join(2) is None else None
            self._restart()
            return "died", f"worker exit code {code}"

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.proc.kill()
            self.proc.join(5)


# --- the campaign -----------------------------------------------------------------------------


@dataclass
class Report:
    files: int = 0
    series: int = 0
    controls_ok: int = 0
    controls: int = 0
    counts: Counter = field(default_factory=Counter)  # (stage, outcome) -> n
    by_mutator: Counter = field(default_factory=Counter)  # (mutator, stage, outcome) -> n
    findings: list = field(default_factory=list)  # (stage, mutator, seed, outcome, detail)
    hangs: list = field(default_factory=list)  # calls killed over the budget (same tuple)
    rows: list = field(default_factory=list)  # (stage, item, outcome)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'stage':8} {'outcome':28} {'count':>7}"]
        for (stage, outcome), n in sorted(self.counts.items()):
            lines.append(f"{stage:8} {outcome:28} {n:7d}")
        lines.append(
            f"files={self.files} series={self.series} controls_ok={self.controls_ok}/"
            f"{self.controls} findings={len(self.findings)} hangs_killed={len(self.hangs)} "
            f"seconds={self.seconds:.1f}"
        )
        return "\n".join(lines)


def run_campaign(
    *,
    files: int,
    series: int,
    seed: int,
    workdir: Path,
    real_ct: Path | None = None,
    budget_s: float = TIME_BUDGET_S,
    progress: Callable[[str], None] | None = None,
    keep: Path | None = None,
) -> Report:
    """Mutate ``files`` files and ``series`` series (seeded) and run each through the ingest.

    ``keep``: a folder to copy each finding's file (or series folder) into, to replay it."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    seeds, phantom_series = phantom_seeds(workdir)
    rseeds, ge = real_seeds(real_ct)
    rep = Report()
    box = Sandbox(budget_s)
    scratch = Path(tempfile.mkdtemp(prefix="cases-", dir=workdir))

    def record(stage, item, mutator, seed_name, outcome, detail):
        rep.counts[(stage, outcome)] += 1
        rep.by_mutator[(mutator, stage, outcome)] += 1
        rep.rows.append((stage, item, outcome))
        if outcome in FINDINGS:
            rep.findings.append((stage, mutator, seed_name, outcome, detail))
        if outcome == HANG and detail.startswith("killed"):
            rep.hangs.append((stage, mutator, seed_name, outcome, detail))

    try:
        # intact controls: every seed file and every seed series must be ok
        # (two real codecs, JPEG 10/12-bit .4.53/.4.55, no installed decoder reads: refused)
        for s in seeds + rseeds:
            p = scratch / "control.dcm"
            p.write_bytes(s.data)
            for stage in ("header", "decode"):
                out, det = box.call(stage, str(p))
                rep.controls += 1
                refused = s.name.startswith("real/") and out == "unsupported_transfer_syntax"
                rep.controls_ok += out == "ok" or refused
                record(stage, "control:" + s.name, "none", s.name, out, det)
        for name, fs in list(phantom_series.items()) + ([("real/GE", ge)] if ge else []):
            out, det = box.call("series", [str(f) for f in fs])
            rep.controls += 1
            rep.controls_ok += out == "ok"
            record("series", "control:" + name, "none", name, out, det)
        pool = seeds + rseeds
        weights = np.array([1.0] * len(seeds) + [0.4] * len(rseeds))
        weights /= weights.sum()
        for i in range(files):
            s = pool[int(rng.choice(len(pool), p=weights))]
            mut, data = mutate_file(s, rng)
            name = f"f{i:06d}.dcm"
            p = scratch / name
            p.write_bytes(data)
            for stage in ("header", "decode"):
                out, det = box.call(stage, str(p))
                record(stage, name, mut, s.name, out, det)
                if keep is not None and (out in FINDINGS or out == HANG):
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(p, keep / f"{name}-{mut}-{stage}-{out}.dcm")
            p.unlink()
            rep.files += 1
            if progress and (i + 1) % 1000 == 0:
                progress(f"{i + 1} files, {len(rep.findings)} findings")
        sources = list(phantom_series.values()) + ([ge] if ge else [])
        for j in range(series):
            src = sources[int(rng.integers(len(sources)))] if j % 10 else sources[0]
            if src is ge and rng.integers(4):  # the real 512x512 series: a quarter of its turns
                src = sources[0]
            folder = scratch / f"s{j:05d}"
            mut = mutate_series(src, folder, rng)
            out, det = box.call("series", [str(f) for f in sorted(folder.iterdir())])
            record("series", folder.name, mut, src[0].parent.name, out, det)
            if keep is not None and (out in FINDINGS or out == HANG):
                shutil.copytree(folder, keep / f"{folder.name}-{mut}-{out}")
            shutil.rmtree(folder)
            rep.series += 1
    finally:
        box.close()
        shutil.rmtree(scratch, ignore_errors=True)
    rep.seconds = time.perf_counter() - t0
    return rep
