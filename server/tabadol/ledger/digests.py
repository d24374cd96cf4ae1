"""The secret that keys payload digests: without it, a digest cannot confirm a guessed payload.

A plain SHA-256 of a small message (a national id and a date) is easy to confirm by
guessing; an HMAC-SHA256 with a key kept in the PKI directory is not. Every broker node
writing one exchange's ledger needs the same key, so their digests compare.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from tabadol.errors import ConfigError

log = logging.getLogger("tabadol.ledger")

KEY_FILE = "payload-digest.key"
KEY_BYTES = 32


def payload_digest_key(pki_dir: Path) -> bytes:
    """The key in ``<pki_dir>/payload-digest.key``, created (32 random bytes, 0600) if missing."""
    path = pki_dir / KEY_FILE
    if not path.exists():
        _create(path)
    try:
        key = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the payload digest key: {e.strerror}") from e
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{path}: the payload digest key must be {KEY_BYTES} bytes, not {len(key)}; "
            "copy the one the other broker nodes use, or remove it to have a new one made"
        )
    return key


def _create(path: Path) -> None:
    """Write the key whole under a temporary name, then link it into place: a reader never
    sees half a key, and when several workers start at once the first one's key wins."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # another broker process made it first
        log.info("created the payload digest key %s (mode 0600)", path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the payload digest key: {e.strerror}") from e
    finally:
        temporary.unlink(missing_ok=True)
