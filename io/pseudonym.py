"""Pseudonymous patient keys: a keyed hash (HMAC-SHA256) of PatientID.

PatientID itself is never stored or logged by pdacscreen; every table carries ``patient_key``
instead.  The key is configuration, resolved by :func:`resolve_key` in this order:

1. an explicit ``key`` argument (bytes);
2. the environment variable ``PDACSCREEN_PSEUDONYM_KEY`` (its UTF-8 bytes);
3. the environment variable ``PDACSCREEN_PSEUDONYM_KEY_FILE``: the path of a file whose bytes
   (surrounding whitespace stripped) are the key;
4. otherwise :data:`DEMO_KEY`, a fixed key that is public (it is in this file): **demo only** —
   it pseudonymises nothing against anyone who has the source code. A warning is logged.

Each index stores :func:`key_fingerprint` of the key it was built with, so an update with a
different key is refused instead of silently splitting patients.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
from pathlib import Path

from pdacscreen.io.errors import PseudonymKeyError

__all__ = ["DEMO_KEY", "ENV_KEY", "ENV_KEY_FILE", "key_fingerprint", "patient_key", "resolve_key"]

log = logging.getLogger(__name__)

ENV_KEY = "PDACSCREEN_PSEUDONYM_KEY"
ENV_KEY_FILE = "PDACSCREEN_PSEUDONYM_KEY_FILE"
#: Public, fixed key used when nothing is configured. Demo only: not a secret.
DEMO_KEY = b"pdacscreen-demo-pseudonym-key (public, demo only)"
_MIN_KEY_BYTES = 16


def resolve_key(key: bytes | None = None) -> bytes:
    """The pseudonym key to use: explicit, env var, key file, else the public demo key."""
    if key is not None:
        if not isinstance(key, bytes | bytearray) or len(key) == 0:
            raise PseudonymKeyError(f"key must be non-empty bytes, got {type(key).__name__}")
        return bytes(key)
    env = os.environ.get(ENV_KEY)
    if env:
        return _checked(env.encode("utf-8"), source=ENV_KEY)
    path = os.environ.get(ENV_KEY_FILE)
    if path:
        try:
            data = Path(path).read_bytes().strip()
        except OSError as e:
            raise PseudonymKeyError(f"{ENV_KEY_FILE}={path!r} cannot be read: {e}") from e
        if not data:
            raise PseudonymKeyError(f"{ENV_KEY_FILE}={path!r} is empty; put a random key in it")
        return _checked(data, source=ENV_KEY_FILE)
    _warn_demo_key_once()
    return DEMO_KEY


@functools.cache
def _warn_demo_key_once() -> None:
    """One warning per process, not one per file or series."""
    log.warning(
        "no pseudonym key configured (%s or %s): using the public DEMO key; "
        "patient keys are NOT pseudonymous against anyone with the source code",
        ENV_KEY,
        ENV_KEY_FILE,
    )


def _checked(key: bytes, *, source: str) -> bytes:
    if len(key) < _MIN_KEY_BYTES:
        log.warning(
            "pseudonym key from %s is short (%d bytes); use >= 32 random bytes", source, len(key)
        )
    return key


def patient_key(patient_id: str, *, key: bytes) -> str:
    """Pseudonymous key of a PatientID: first 32 hex digits of HMAC-SHA256(key, id).

    Surrounding whitespace and DICOM padding (trailing NUL/space) are ignored, so the same ID
    written by two systems gets the same key.  Deterministic for a given key.
    """
    if not isinstance(patient_id, str):
        raise PseudonymKeyError(f"patient_id must be str, got {type(patient_id).__name__}")
    norm = patient_id.strip(" \x00\t\r\n")
    return hmac.new(key, norm.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def key_fingerprint(key: bytes) -> str:
    """A short, non-reversible identifier of a key (to detect key changes between runs)."""
    return hmac.new(key, b"pdacscreen key fingerprint", hashlib.sha256).hexdigest()[:16]
