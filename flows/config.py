"""The sweep's configuration: ONE frozen object, built once in the driver, passed to every task.

Nothing below the command line reads the environment: the driver resolves the pseudonym key,
the selection rules, the model package and the engine configuration into a :class:`SweepConfig`
and hands that object (plain, picklable) to the Prefect tasks, the Ray loader tasks and the
engine actors.  A worker node therefore computes the same patient keys and derived UIDs as the
driver, whatever its own environment says.

The config hash (``config_hash`` in every findings row) covers everything that changes a finding:
the model package's sha256, the selection rules (with their version), the resolved
:class:`~pdacscreen.engine.config.EngineConfig` and the detector's localisation check
(:class:`~pdacscreen.engine.postprocess.LocalisationQC`).  A new model, new rules or another engine
(TensorRT FP16 instead of ONNX Runtime FP32) is a new hash, so the next sweep re-processes every
study for it deliberately and keeps the earlier rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import SecretBytes

from pdacscreen.engine.config import EngineConfig
from pdacscreen.engine.postprocess import LocalisationQC
from pdacscreen.io.dicomweb import DicomwebSource
from pdacscreen.io.errors import InputError
from pdacscreen.io.pseudonym import check_key, key_fingerprint
from pdacscreen.io.select import SelectionRules

__all__ = ["DICOM_RESULTS", "SweepConfig", "config_hash"]

#: which studies get a DICOM SEG + SR in ``STORE/dicom/``: every ``ok`` study (all of them have a
#: pancreas: without one a study is ``not_assessable``), only the flagged ones, or none
DICOM_RESULTS = ("all", "flagged", "none")


def config_hash(*, model_sha256: str, rules: SelectionRules, engine: EngineConfig) -> str:
    """16 hex digits of SHA-256 over the model, the rules and the resolved engine config."""
    # The rules by content: their file's location (``source``) differs between machines.
    rules_d = {k: v for k, v in asdict(rules).items() if k != "source"}
    # The detector's localisation check can grow a crop and rerun stage 2: its settings change
    # findings as the model does.
    loc = asdict(LocalisationQC())
    blob = json.dumps(
        {"model": model_sha256, "rules": rules_d, "engine": engine.as_dict(), "localisation": loc},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepConfig:
    """Everything one sweep needs; built by :meth:`build` in the driver.

    Attributes:
        archive: the archive (a folder, or a ``dicomweb+http(s)://`` URL).
        store: the findings store folder.
        model: the model package folder (``None``: the shipped reference model).
        model_name, model_version, model_sha256: from the loaded package.
        rules: the selection rules (their ``phase_check`` thresholds decide the phase too).
        engine: the resolved engine configuration (no ``auto`` left where it matters).
        pseudonym_key: the key, as a pydantic ``SecretBytes`` so that Prefect records it as
            ``**********`` among the flow's parameters and ``repr`` never shows it.
        ray_address: a Ray cluster to join (``None``: a local runtime).
        limit: process at most this many studies.
        n_actors: engine actors (``None``: one per GPU, else half the CPUs).
        flush_every: studies per atomic findings file.
        load_timeout_s: a study whose series takes longer to load is killed (``decode_timeout``).
        hash_paths: failures rows name files by keyed hashes of their archive paths (not in the
            config hash: it changes no finding).
        source: the DICOMweb source when ``archive`` is ``dicomweb+http(s)://`` (its credentials
            are ``SecretStr``; not in the config hash: where the images come from changes no
            finding).
        dicom_results: which studies get a DICOM SEG + TID 1500 SR in ``STORE/dicom/``:
            ``all`` (every ``ok`` study, i.e. every study with a pancreas), ``flagged`` or
            ``none`` (:data:`DICOM_RESULTS`; not in the config hash: it changes no finding).
        write_back: send those objects to the DICOMweb source by STOW-RS (``source`` only).
        hash: the config hash (see :func:`config_hash`).
    """

    archive: str
    store: Path
    model: Path | None
    model_name: str
    model_version: str
    model_sha256: str
    rules: SelectionRules
    engine: EngineConfig
    pseudonym_key: SecretBytes = field(repr=False)
    ray_address: str | None = None
    limit: int | None = None
    n_actors: int | None = None
    flush_every: int = 8
    load_timeout_s: float = 900.0
    hash_paths: bool = False
    source: DicomwebSource | None = None
    dicom_results: str = "all"
    write_back: bool = False
    hash: str = ""

    def __post_init__(self) -> None:
        check_key(self.pseudonym_key.get_secret_value())
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1 or None, got {self.limit}")
        if self.n_actors is not None and self.n_actors < 1:
            raise InputError(f"n_actors must be >= 1 or None, got {self.n_actors}")
        if self.flush_every < 1:
            raise InputError(f"flush_every must be >= 1, got {self.flush_every}")
        if self.dicom_results not in DICOM_RESULTS:
            raise InputError(
                f"dicom_results={self.dicom_results!r} is not allowed; use one of {DICOM_RESULTS}"
            )
        if self.write_back and (self.source is None or self.dicom_results == "none"):
            raise InputError(
                "write_back sends the DICOM results to the source PACS: it needs a "
                "dicomweb+http(s):// archive and dicom_results 'all' or 'flagged', got "
                f"archive={'dicomweb' if self.source else 'a folder'}, "
                f"dicom_results={self.dicom_results!r}"
            )
        if not self.hash:
            object.__setattr__(
                self,
                "hash",
                config_hash(model_sha256=self.model_sha256, rules=self.rules, engine=self.engine),
            )

    @property
    def key(self) -> bytes:
        """The pseudonym key bytes (for io functions; never log them)."""
        return self.pseudonym_key.get_secret_value()

    @property
    def key_fingerprint(self) -> str:
        return key_fingerprint(self.key)

    def describe(self) -> dict:
        """A JSON-able description for the run manifest (no key, only its fingerprint)."""
        return {
            "archive": self.archive if "://" not in self.archive else _redact_url(self.archive),
            "store": str(self.store),
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "sha256": self.model_sha256,
                "path": str(self.model) if self.model else "reference",
            },
            "rules": {"version": self.rules.version, "sha256": self.rules.sha256},
            "engine": self.engine.as_dict(),
            "config_hash": self.hash,
            "pseudonym_key_fingerprint": self.key_fingerprint,
            "ray_address": self.ray_address,
            "limit": self.limit,
            "n_actors": self.n_actors,
            "flush_every": self.flush_every,
            "load_timeout_s": self.load_timeout_s,
            "hash_paths": self.hash_paths,
            "source": self.source.describe() if self.source else None,
            "dicom_results": self.dicom_results,
            "write_back": self.write_back,
        }


def _redact_url(url: str) -> str:
    """A URL without user:password@ (credentials never go into manifests)."""
    scheme, _, rest = url.partition("://")
    host, sep, path = rest.partition("/")
    return f"{scheme}://{host.rpartition('@')[2]}{sep}{path}"
