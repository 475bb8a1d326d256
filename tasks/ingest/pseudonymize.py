"""Keyed pseudonyms (HMAC-SHA256) for patient, study, series and image identifiers."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from data_schemas.files import atomic_write_bytes

HMAC_KEY_ENV = "CTCOMPARE_HMAC_KEY"
KEY_FILE_NAME = "hmac.key"
PSEUDONYM_HEX_CHARS = 20  # 80 bits: collisions are negligible for any realistic archive


def load_or_create_secret(private_dir: Path) -> bytes:
    """The pseudonymization secret: $CTCOMPARE_HMAC_KEY if set, else private/hmac.key (created 0600 on first use)."""
    from_env = os.environ.get(HMAC_KEY_ENV)
    if from_env:
        return from_env.encode("utf-8")
    private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # only the owner may read the private part
    key_path = private_dir / KEY_FILE_NAME
    existing = key_path.read_bytes().strip() if key_path.exists() else b""
    if existing:
        return existing
    # Created whole or not at all (a run killed mid-write never leaves an empty key), 0600. Callers hold the
    # dataset folder's write lock, so no concurrent run creates another.
    secret = secrets.token_hex(32).encode("ascii")
    atomic_write_bytes(key_path, secret, mode=0o600)
    return secret


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    """Keyed hash of one identifier; `kind` separates namespaces so equal strings of different kinds differ."""
    digest = hmac.new(secret, f"{kind}\x00{value}".encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX_CHARS]
