"""A DICOMweb archive as a sweep source: QIDO-RS search, WADO-RS metadata and retrieve, STOW-RS.

A source is written ``dicomweb+http(s)://HOST:PORT/ROOT`` (e.g. ``dicomweb+http://pacs:8042/
dicom-web``).  What goes over the wire, per study:

* QIDO-RS: the CT studies (``ModalitiesInStudy=CT``, an optional ``StudyDate`` range), paged with
  ``limit``/``offset``; then the study's series.
* WADO-RS ``/metadata`` of each series (instance headers as DICOM JSON, no pixel data): the same
  header fields the folder index holds (:func:`metadata_rows` makes index rows through the folder
  crawl's own value rules, so the selection rules see the same values and choose the same series).
* WADO-RS retrieve of ONLY the chosen series, asking for the transfer syntax the server holds
  (``Accept: multipart/related; type="application/dicom"; transfer-syntax=*``: no server-side
  transcoding), into a per-study cache folder that the caller deletes after the study
  (:func:`fetch_series`), bounded by ``max_cache_bytes``.
* STOW-RS of the sweep's results (``--write-back``, :func:`send_pending`): the DICOM SEG and SR
  written into the store for the source's studies whose last recorded event is not ``sent``, one
  request per study (``dicomweb-client``'s ``store_instances``: a multipart/related body), each
  object then recorded ``sent`` or ``failed`` with a code (``source_unauthorized`` on 401/403,
  ``source_unavailable`` after the retries, ``stow_rejected`` with the server's failure reason,
  ``export_file_missing``).  The SOP Instance UIDs are derived, so a resend replaces, never adds.

Index rows name an instance by its URL (``dicomweb+http://.../studies/S/series/X/instances/I``):
Study, Series and SOP Instance UIDs, never a PatientID (``patient_key`` is the keyed hash, as for
files).  Credentials never appear in a URL, a message, a log line or a row: basic auth or a
bearer token comes from the environment or a file (:func:`source_from_env`), held as
``SecretStr``.  TLS certificates are verified by default (``ca_bundle`` adds a CA bundle).

Errors are :class:`~pdacscreen.io.errors.SourceError` with a code: ``source_unavailable`` (no
connection, timeouts, 5xx, 429: retried with exponential backoff first), ``source_unauthorized``
(401/403: never retried), ``series_vanished`` (404 for a series the index listed),
``truncated_response`` (a multipart body cut short or an instance incomplete: retried, then
this code).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import requests
from pydantic import SecretStr
from pydicom.dataset import Dataset

from pdacscreen.io.dicom.export import ExportRecord, append_exports, pending_sends
from pdacscreen.io.dicom.read import (
    _KEYWORDS,
    INDEX_COLUMNS,
    _check_image,
    _get,
    _info,
    _Scan,
)
from pdacscreen.io.errors import ErrorCode, InputError, PdacscreenError, SourceError

__all__ = [
    "PREFIX",
    "DicomwebClient",
    "DicomwebSource",
    "InstanceRef",
    "fetch_series",
    "index_source",
    "is_dicomweb",
    "metadata_rows",
    "parse_instance_url",
    "send_pending",
    "source_from_env",
]

log = logging.getLogger(__name__)

PREFIX = "dicomweb+"
ENV_USER = "PDACSCREEN_DICOMWEB_USER"
ENV_PASSWORD = "PDACSCREEN_DICOMWEB_PASSWORD"
ENV_PASSWORD_FILE = "PDACSCREEN_DICOMWEB_PASSWORD_FILE"
ENV_TOKEN = "PDACSCREEN_DICOMWEB_TOKEN"
ENV_TOKEN_FILE = "PDACSCREEN_DICOMWEB_TOKEN_FILE"
ENV_CA_BUNDLE = "PDACSCREEN_DICOMWEB_CA_BUNDLE"

#: the Accept media type of a series retrieve: DICOM files in the syntax the server holds
AS_STORED = (("application/dicom", "*"),)
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_SAFE = re.compile(r"[^0-9A-Za-z._-]")
T = TypeVar("T")


def is_dicomweb(archive: str) -> bool:
    """Whether ``archive`` names a DICOMweb source (``dicomweb+http://`` or ``+https://``)."""
    return str(archive).startswith((PREFIX + "http://", PREFIX + "https://"))


@dataclass(frozen=True)
class DicomwebSource:
    """A DICOMweb service and how to talk to it (plain and picklable: it travels to the loaders).

    Attributes:
        url: the service root, ``http(s)://host:port/path`` (no ``dicomweb+``, no credentials).
        user, password: HTTP basic auth (``password`` a ``SecretStr``); or ``token``: a bearer token.
        verify: verify TLS certificates (default on); ``ca_bundle``: a CA bundle file to trust.
        timeout_s: seconds per HTTP request (connect and read).
        attempts: tries per request for transient errors; ``backoff_s``: first wait, doubled each time.
        page_size: QIDO ``limit`` per page.
        study_date: a QIDO StudyDate value or range (``20240101-``, ``20240101-20240131``), or None.
        max_cache_bytes: the most one study's retrieved series may take on disk.
    """

    url: str
    user: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    token: SecretStr | None = field(default=None, repr=False)
    verify: bool = True
    ca_bundle: str | None = None
    timeout_s: float = 60.0
    attempts: int = 4
    backoff_s: float = 1.0
    page_size: int = 100
    study_date: str | None = None
    max_cache_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        url = self.url.removeprefix(PREFIX).rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(
                f"DICOMweb url must be http(s)://host[:port]/path, got {_redact(url)!r}"
            )
        if parts.username or parts.password:
            raise InputError(
                "DICOMweb url must not hold credentials (user:password@); set "
                f"{ENV_USER} + {ENV_PASSWORD} (or _FILE), or {ENV_TOKEN} (or _FILE)"
            )
        object.__setattr__(self, "url", url)
        for name in ("attempts", "page_size", "max_cache_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise InputError(
                f"timeout_s must be > 0 and backoff_s >= 0, got {self.timeout_s}, {self.backoff_s}"
            )
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise InputError(f"ca_bundle={self.ca_bundle!r} is not a file")

    @property
    def archive(self) -> str:
        """The source string (``dicomweb+URL``) as index rows and manifests name it."""
        return PREFIX + self.url

    def describe(self) -> dict[str, Any]:
        """For manifests: the URL and how it authenticates, never the secrets."""
        auth = "bearer" if self.token else ("basic" if self.user else "none")
        return {"url": self.url, "auth": auth, "verify": self.verify, "ca_bundle": self.ca_bundle}


def _secret_from(env: Mapping[str, str], name: str, file_name: str) -> SecretStr | None:
    value = env.get(name)
    if value:
        return SecretStr(value)
    path = env.get(file_name)
    if path:
        try:
            text = Path(os.path.expanduser(path)).read_text().strip()
        except OSError as e:
            raise InputError(f"{file_name}={path!r} cannot be read: {e}") from e
        if not text:
            raise InputError(f"{file_name}={path!r} is empty")
        return SecretStr(text)
    return None


def source_from_env(
    archive: str, *, environ: Mapping[str, str] | None = None, **options: Any
) -> DicomwebSource:
    """The source ``archive`` with its credentials and CA bundle from the environment (driver only).

    Basic auth: ``PDACSCREEN_DICOMWEB_USER`` + ``PDACSCREEN_DICOMWEB_PASSWORD`` (or ``_FILE``);
    bearer: ``PDACSCREEN_DICOMWEB_TOKEN`` (or ``_FILE``); ``PDACSCREEN_DICOMWEB_CA_BUNDLE``: a CA
    bundle.  ``options``: the other :class:`DicomwebSource` fields.
    """
    env = os.environ if environ is None else environ
    if not is_dicomweb(archive):
        raise InputError(f"archive={_redact(archive)!r} is not dicomweb+http(s)://...")
    token = _secret_from(env, ENV_TOKEN, ENV_TOKEN_FILE)
    password = _secret_from(env, ENV_PASSWORD, ENV_PASSWORD_FILE)
    user = env.get(ENV_USER) or None
    if password is not None and user is None:
        raise InputError(f"{ENV_PASSWORD} is set but {ENV_USER} is not")
    options.setdefault("ca_bundle", env.get(ENV_CA_BUNDLE) or None)
    return DicomwebSource(archive, user=user, password=password, token=token, **options)


def _redact(url: str) -> str:
    scheme, sep, rest = str(url).partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host.rpartition('@')[2]}{slash}{path}"


@dataclass(frozen=True)
class InstanceRef:
    """One instance as an index row names it."""

    url: str  # the service root (no prefix)
    study: str
    series: str
    sop: str


_INSTANCE = re.compile(
    r"^(?P<url>.+)/studies/(?P<st>[^/]+)/series/(?P<se>[^/]+)/instances/(?P<sop>[^/]+)$"
)


def instance_path(url: str, study: str, series: str, sop: str) -> str:
    """The index ``path`` of an instance: ``dicomweb+URL/studies/S/series/X/instances/I``."""
    return f"{PREFIX}{url}/studies/{study}/series/{series}/instances/{sop}"


def parse_instance_url(path: str) -> InstanceRef:
    """The parts of an index ``path`` made by :func:`instance_path`."""
    m = _INSTANCE.match(str(path).removeprefix(PREFIX))
    if not m or not is_dicomweb(path):
        raise InputError(f"path={str(path)[:200]!r} is not a DICOMweb instance path")
    return InstanceRef(m["url"], m["st"], m["se"], m["sop"])


def _value(item: Mapping[str, Any], tag: str) -> Any:
    vals = (item.get(tag) or {}).get("Value") or []
    return vals[0] if vals else None


class _Incomplete(Exception):
    """A response that ended early or an instance cut short (retried, then truncated_response)."""


class DicomwebClient:
    """One HTTP session to a :class:`DicomwebSource` (``dicomweb-client`` does the protocol).

    ``bytes_received`` counts the DICOM bytes retrieved (instances written to the cache) and the
    JSON bytes of searches and metadata, for the run's accounting.
    """

    def __init__(self, source: DicomwebSource, *, sleep: Callable[[float], None] = time.sleep):
        from dicomweb_client.api import DICOMwebClient

        self.source, self._sleep = source, sleep
        self.session = requests.Session()
        if source.token is not None:
            self.session.headers["Authorization"] = "Bearer " + source.token.get_secret_value()
        elif source.user is not None:
            pw = source.password.get_secret_value() if source.password else ""
            self.session.auth = (source.user, pw)
        self.session.verify = source.ca_bundle or source.verify
        self.session.hooks["response"].append(self._count)
        self.client = DICOMwebClient(source.url, session=self.session, timeout=source.timeout_s)
        self.client.set_http_retry_params(retry=False)  # retries are ours (below), with backoff
        self.bytes_received = 0
        self.requests = 0

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DicomwebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.requests += 1
        if "multipart" not in response.headers.get("Content-Type", ""):  # never a stream
            self.bytes_received += len(response.content or b"")

    # -- the retry policy -------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], *, vanished: bool = False) -> T:
        """Run ``fn`` with the retry policy; errors become :class:`SourceError` with a code."""
        where = f"{what} at {self.source.url}"
        wait = self.source.backoff_s
        last: tuple[str, str] = (ErrorCode.SOURCE_UNAVAILABLE, "")
        for attempt in range(1, self.source.attempts + 1):
            try:
                return fn()
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else 0
                if status in (401, 403):
                    raise SourceError(
                        f"{where}: HTTP {status}; check the credentials "
                        f"({ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}) and their rights",
                        code=ErrorCode.SOURCE_UNAUTHORIZED,
                    ) from e
                if status == 404 and vanished:
                    raise SourceError(
                        f"{where}: HTTP 404, it was deleted after it was indexed",
                        code=ErrorCode.SERIES_VANISHED,
                    ) from e
                if status not in _RETRY_STATUS:
                    raise SourceError(f"{where}: HTTP {status}") from e
                last = (ErrorCode.SOURCE_UNAVAILABLE, f"HTTP {status}")
            except (requests.exceptions.ChunkedEncodingError, _Incomplete) as e:
                last = (ErrorCode.TRUNCATED_RESPONSE, f"response cut short: {e}")
            except (requests.ConnectionError, requests.Timeout) as e:
                last = (ErrorCode.SOURCE_UNAVAILABLE, f"{type(e).__name__}: {_short(e)}")
            except ValueError as e:  # the client found no multipart body where one was due
                last = (ErrorCode.TRUNCATED_RESPONSE, f"malformed response: {_short(e)}")
            if attempt < self.source.attempts:
                log.warning("%s failed (%s); retry %d in %.1f s", where, last[1], attempt, wait)
                self._sleep(wait)
                wait = min(2 * wait, 30.0)
        raise SourceError(f"{where}: {last[1]} after {self.source.attempts} attempts", code=last[0])

    # -- QIDO-RS ------------------------------------------------------------------------------
    def studies(self) -> list[dict[str, Any]]:
        """Every CT study (optionally in the StudyDate range), paged with limit/offset."""
        filters: dict[str, Any] = {"ModalitiesInStudy": "CT"}
        if self.source.study_date:
            filters["StudyDate"] = self.source.study_date
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset, limit = 0, self.source.page_size
        while True:
            page = self._call(
                "QIDO studies",
                lambda o=offset: self.client.search_for_studies(
                    limit=limit,
                    offset=o,
                    search_filters=filters,
                    fields=["StudyDate", "NumberOfStudyRelatedInstances"],
                ),
            )
            new = [s for s in page if _value(s, "0020000D") not in seen]
            for s in new:
                seen.add(_value(s, "0020000D"))
            out += new
            if len(page) < limit or not new:  # a server that ignores offset: stop, no loop
                return out
            offset += len(page)

    def series(self, study: str) -> list[dict[str, Any]]:
        return self._call(
            f"QIDO series of study {study}",
            lambda: self.client.search_for_series(study, limit=10000),
        )

    # -- WADO-RS ------------------------------------------------------------------------------
    def series_metadata(self, study: str, series: str) -> list[dict[str, Any]]:
        return self._call(
            f"metadata of series {series}",
            lambda: self.client.retrieve_series_metadata(study, series),
            vanished=True,
        )

    def retrieve_series(
        self, study: str, series: str, *, sops: Iterable[str] | None, folder: Path
    ) -> list[Path]:
        """Retrieve one series in its stored transfer syntax into ``folder`` (``<SOP>.dcm``).

        ``sops``: the instances the index listed (all must come back, else truncated_response;
        others the server now has are ignored).  Returns the files, sorted.
        """
        want = set(sops) if sops is not None else None

        def fetch() -> list[Path]:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            got: dict[str, Path] = {}
            used = 0
            for ds in self.client.iter_series(study, series, media_types=AS_STORED):
                sop = str(ds.get("SOPInstanceUID", ""))
                _check_complete(ds, sop)
                if want is not None and sop not in want:
                    continue
                path = folder / (_SAFE.sub("_", sop)[:120] + ".dcm")
                ds.save_as(path, enforce_file_format=True)
                used += path.stat().st_size
                if used > self.source.max_cache_bytes:
                    raise SourceError(
                        f"series {series} needs more than max_cache_bytes="
                        f"{self.source.max_cache_bytes} on disk; raise it",
                        code=ErrorCode.VOLUME_TOO_LARGE,
                    )
                got[sop] = path
            missing = (want or set()) - set(got)
            if missing or not got:
                raise _Incomplete(
                    f"{len(got)} of {len(want) if want is not None else '?'} instances received"
                )
            self.bytes_received += used
            return sorted(got.values())

        return self._call(f"retrieve of series {series}", fetch, vanished=True)

    # -- STOW-RS ------------------------------------------------------------------------------
    def store(self, paths: Iterable[Path]) -> dict[str, str | None]:
        """Upload files by STOW-RS; ``{SOPInstanceUID: None (stored) | failure reason}``."""
        datasets = [pydicom.dcmread(str(p)) for p in paths]
        if not datasets:
            return {}
        result = self._call("STOW-RS", lambda: self.client.store_instances(datasets))
        out: dict[str, str | None] = {str(d.SOPInstanceUID): "not acknowledged" for d in datasets}
        for item in result.get("ReferencedSOPSequence", []):
            out[str(item.ReferencedSOPInstanceUID)] = None
        for item in result.get("FailedSOPSequence", []):
            out[str(item.ReferencedSOPInstanceUID)] = f"failure reason {item.get('FailureReason')}"
        return out


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


def _check_complete(ds: Dataset, sop: str) -> None:
    """An instance whose pixel data is missing or shorter than its header says was cut short."""
    if not sop:
        raise _Incomplete("an instance without SOPInstanceUID (part cut short?)")
    pixels = ds.get("PixelData")
    if pixels is None:
        if "Rows" in ds:
            raise _Incomplete(f"instance {sop} has no pixel data")
        return
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and ts.is_compressed:
        from pydicom.encaps import generate_fragments

        try:
            n = sum(1 for _ in generate_fragments(pixels))
        except (ValueError, EOFError) as e:
            raise _Incomplete(f"instance {sop}: encapsulated pixel data broken: {e}") from e
        if n < 2:  # the offset table and at least one fragment
            raise _Incomplete(f"instance {sop}: encapsulated pixel data has no fragment")
        return
    need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    need *= int(ds.BitsAllocated) // 8
    if len(pixels) < need:
        raise _Incomplete(f"instance {sop}: {len(pixels)} pixel bytes of {need}")


# -- index rows ---------------------------------------------------------------------------------


def _dataset(item: Mapping[str, Any]) -> Dataset:
    return Dataset.from_json(dict(item), bulk_data_uri_handler=lambda *a: None)


def metadata_rows(
    metadata: list[Mapping[str, Any]], *, url: str, study: str, series: str, key: bytes
) -> list[dict[str, Any]]:
    """Index rows (:data:`~pdacscreen.io.dicom.read.INDEX_COLUMNS`) for a series' instances.

    Values go through the folder crawl's own rules (canonical values, derived UIDs where blank,
    keyed patient hashes, scrubbed free text), so a series gets the same row from a PACS as from
    its files; ``transfer_syntax_uid`` is unknown (WADO metadata does not carry it), ``size`` and
    ``mtime_ns`` too.  An instance whose header cannot be used is a row with status ``error``.
    """
    rows = []
    for item in metadata:
        row: dict[str, Any] = {c: None for c in INDEX_COLUMNS}
        sop = _value(item, "00080018") or ""
        row.update(
            path=instance_path(url, study, series, sop), status="ok", flags="", has_pixel_data=False
        )
        try:
            ds = _dataset(item)
            values = {}
            for kw in _KEYWORDS:
                v = ds.get(kw, None)
                values[kw] = str(v) if isinstance(v, pydicom.valuerep.PersonName) else v
            scan = _Scan(values, None, None, None, None)
            row.update(_info(scan, key=key))
            row["has_pixel_data"] = row["rows"] is not None and row["columns"] is not None
            _check_image(row, where="", bits=_get(scan, "BitsAllocated", "int"))
        except PdacscreenError as e:
            row.update(status="error", error_code=str(e.code), error_message=str(e)[:500])
        except Exception as e:  # noqa: BLE001 - a bad header is a row, never a crashed index
            row.update(
                status="error",
                error_code=str(ErrorCode.UNREADABLE),
                error_message=f"metadata: {type(e).__name__}: {_short(e)}",
            )
        rows.append(row)
    return rows


@dataclass
class SourceIndex:
    """What :func:`index_source` found: index rows of new studies and the problems met."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    studies_found: int = 0
    studies_indexed: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    bytes_received: int = 0


def index_source(
    source: DicomwebSource,
    *,
    key: bytes,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
    known: Mapping[str, int] | None = None,
) -> SourceIndex:
    """Index rows for the source's CT studies not in ``skip`` (e.g. processed already).

    ``known``: ``{study UID: instance count}`` already indexed; such a study with the same
    NumberOfStudyRelatedInstances is not asked again.  A study whose series cannot be listed or
    read is left out whole (so it is not half-indexed) and named in ``problems`` with its code;
    a source that cannot be searched at all is one problem without a study UID.  401/403 stop
    the indexing (every further request would fail the same way).
    """
    out = SourceIndex()
    known = known or {}
    with DicomwebClient(source) as client:
        try:
            studies = client.studies()
        except SourceError as e:
            out.problems.append(_problem("study", None, None, e))  # every study: none listed
            return out
        out.studies_found = len(studies)
        for st in studies:
            study = _value(st, "0020000D")
            if not study or study in skip:
                continue
            count = _value(st, "00201208")
            if count is not None and known.get(study) == int(count):
                continue
            try:
                rows = []
                for se in client.series(study):
                    series = _value(se, "0020000E")
                    if series:
                        md = client.series_metadata(study, series)
                        rows += metadata_rows(
                            md, url=source.url, study=study, series=series, key=key
                        )
            except SourceError as e:
                out.problems.append(_problem("study", study, None, e))
                if e.code == ErrorCode.SOURCE_UNAUTHORIZED:
                    break
                continue
            out.rows += rows
            out.studies_indexed += 1
        out.bytes_received = client.bytes_received
    return out


def _problem(scope: str, study: str | None, series: str | None, e: PdacscreenError) -> dict:
    return {
        "scope": scope,
        "study_instance_uid": study,
        "series_instance_uid": series,
        "error_code": str(e.code),
        "message": str(e)[:2000],
    }


def fetch_series(source: DicomwebSource, paths: Iterable[str], *, folder: Path) -> list[Path]:
    """Retrieve the instances named by index ``paths`` (one series) into ``folder``.

    The caller deletes ``folder`` when the study is done (``shutil.rmtree``).
    """
    refs = [parse_instance_url(p) for p in paths]
    if not refs:
        raise InputError("paths is empty; pass the chosen series' index paths")
    pairs = {(r.study, r.series) for r in refs}
    if len(pairs) != 1:
        raise InputError(f"paths name {len(pairs)} series; pass one series")
    study, series = pairs.pop()
    with DicomwebClient(source) as client:
        return client.retrieve_series(study, series, sops=[r.sop for r in refs], folder=folder)


# -- STOW-RS of results ------------------------------------------------------------------------


def send_pending(source: DicomwebSource, *, store: Path, sweep_id: str) -> dict[str, int]:
    """Send the store's written results of ``source``'s studies that are not ``sent`` yet.

    One STOW-RS request per study (its SEG and SR); every object gets a ``send`` record in
    ``STORE/dicom_exports/``: ``sent``, or ``failed`` with a code and a message (no credentials,
    no patient identifiers).  After a 401/403, or a server still unreachable after the retries,
    nothing more is tried (each request would fail the same way); the rest are recorded
    ``failed`` with that code and sent next run.  Returns counts by status.
    """
    pending = pending_sends(store, source=source.archive)
    by_study: dict[str, list[dict[str, Any]]] = {}
    for obj in pending:
        by_study.setdefault(str(obj["study_instance_uid"]), []).append(obj)
    records: list[dict[str, Any]] = []
    refused: SourceError | None = None

    def record(obj: dict[str, Any], status: str, code: str | None, message: str | None) -> None:
        rec = ExportRecord(
            study_instance_uid=str(obj["study_instance_uid"]),
            object=str(obj["object"]),
            action="send",
            status=status,
            sop_instance_uid=str(obj["sop_instance_uid"]),
            series_instance_uid=obj.get("series_instance_uid"),
            path=obj.get("path"),
            source=source.archive,
            error_code=code,
            message=message,
        ).row()
        rec.update(model_version=obj.get("model_version"), config_hash=obj.get("config_hash"))
        records.append(rec)

    if by_study:
        with DicomwebClient(source) as client:
            for objs in by_study.values():
                here = [o for o in objs if (Path(store) / str(o["path"])).is_file()]
                for o in objs:
                    if o not in here:
                        record(o, "failed", "export_file_missing", "the file is not in the store")
                if not here:
                    continue
                if refused is not None:
                    for o in here:
                        record(o, "failed", str(refused.code), "not tried: " + _short(refused))
                    continue
                try:
                    result = client.store([Path(store) / str(o["path"]) for o in here])
                except SourceError as e:
                    for o in here:
                        record(o, "failed", str(e.code), _short(e))
                    if e.code in (ErrorCode.SOURCE_UNAUTHORIZED, ErrorCode.SOURCE_UNAVAILABLE):
                        refused = e  # the next study would meet the same (after its retries)
                    continue
                for o in here:
                    reason = result.get(str(o["sop_instance_uid"]), "not acknowledged")
                    if reason is None:
                        record(o, "sent", None, None)
                    else:
                        record(o, "failed", "stow_rejected", str(reason)[:500])
    append_exports(store, records, sweep_id=sweep_id)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if records:
        log.info("STOW-RS to %s: %s", source.url, counts)
    return counts
