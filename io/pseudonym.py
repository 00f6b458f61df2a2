"""Pseudonymous patient keys: a keyed hash (HMAC-SHA256) of PatientID.

PatientID itself is never stored or logged by pdacscreen; every table carries ``patient_key``
instead.  The key is configuration: the command line resolves it ONCE, in the driver, with
:func:`load_key`, and passes the bytes explicitly to every function and worker that needs them
(nothing below the command line reads the environment).  :func:`load_key` looks in this order:

1. the environment variable ``PDACSCREEN_PSEUDONYM_KEY`` (its UTF-8 bytes);
2. the environment variable ``PDACSCREEN_PSEUDONYM_KEY_FILE``: the path of a file whose bytes
   (surrounding whitespace stripped) are the key;
3. with ``demo=True`` only (``--demo-key``: ``make demo`` and the tests): :data:`DEMO_KEY`, a fixed
   key that is public (it is in this file) and pseudonymises nothing against anyone who has the
   source code; otherwise it refuses, saying how to make a key.

Each index stores :func:`key_fingerprint` of the key it was built with, so an update with a
different key is refused instead of silently splitting patients.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from pdacscreen.io.errors import PseudonymKeyError

__all__ = [
    "DEMO_KEY",
    "ENV_KEY",
    "ENV_KEY_FILE",
    "check_key",
    "key_fingerprint",
    "load_key",
    "patient_key",
]

log = logging.getLogger(__name__)

ENV_KEY = "PDACSCREEN_PSEUDONYM_KEY"
ENV_KEY_FILE = "PDACSCREEN_PSEUDONYM_KEY_FILE"
#: Public, fixed key used when nothing is configured. Demo only: not a secret.
DEMO_KEY = b"pdacscreen-demo-pseudonym-key (public, demo only)"
_MIN_KEY_BYTES = 16


MAKE_KEY_HELP = (
    "make one once and keep it secret and stable (patient keys change with it):\n"
    "  mkdir -p ~/.pdacscreen && python3 -c 'import secrets; print(secrets.token_hex(32))' "
    "> ~/.pdacscreen/pseudonym.key && chmod 600 ~/.pdacscreen/pseudonym.key\n"
    f"  export {ENV_KEY_FILE}=~/.pdacscreen/pseudonym.key\n"
    "or pass --demo-key to use the public demo key (synthetic data only)"
)


def load_key(*, demo: bool = False, environ: Mapping[str, str] | None = None) -> bytes:
    """The configured pseudonym key (see the module docstring); call once, in the driver.

    Raises :class:`PseudonymKeyError` when no key is configured and ``demo`` is false, or when the
    key file cannot be read or is empty.
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV_KEY)
    if value:
        return _checked(value.encode("utf-8"), source=ENV_KEY)
    path = env.get(ENV_KEY_FILE)
    if path:
        path = os.path.expanduser(path)
        try:
            data = Path(path).read_bytes().strip()
        except OSError as e:
            raise PseudonymKeyError(f"{ENV_KEY_FILE}={path!r} cannot be read: {e}") from e
        if not data:
            raise PseudonymKeyError(f"{ENV_KEY_FILE}={path!r} is empty; put a random key in it")
        return _checked(data, source=ENV_KEY_FILE)
    if demo:
        _warn_demo_key_once()
        return DEMO_KEY
    raise PseudonymKeyError(
        f"no pseudonym key configured ({ENV_KEY} or {ENV_KEY_FILE}): patient keys would be "
        f"reversible by anyone with the source code; {MAKE_KEY_HELP}"
    )


def check_key(key: object) -> bytes:
    """``key`` as bytes, or :class:`PseudonymKeyError` if it is not non-empty bytes."""
    if not isinstance(key, bytes | bytearray) or len(key) == 0:
        raise PseudonymKeyError(
            f"key must be non-empty bytes (resolve it once with load_key), got {type(key).__name__}"
        )
    return bytes(key)


@functools.cache
def _warn_demo_key_once() -> None:
    """One warning per process, not one per file or series."""
    log.warning(
        "--demo-key: using the public DEMO pseudonym key (not %s / %s); "
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
