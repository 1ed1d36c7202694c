"""API keys: only their SHA-256 digests are configured, a request's key is hashed and looked up.

A key's owner name (its configured name, or the start of its digest) tags every job it submits; other
keys cannot see those jobs. Without any configured key the service is open and every job belongs to
``anonymous``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from service.problems import ProblemError
from service.settings import Settings

ANONYMOUS = "anonymous"
DIGEST = re.compile(r"[0-9a-f]{64}")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _parse_entry(entry: str, source: str) -> tuple[str, str]:
    """``digest`` or ``name:digest`` -> (digest, owner name)."""
    name, _, digest = entry.strip().rpartition(":")
    digest = digest.lower()
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"{source}: {entry!r} is not a SHA-256 hex digest (or name:digest)")
    return digest, name or digest[:12]


class KeyRing:
    def __init__(self, owners_by_digest: dict[str, str]) -> None:
        self.owners_by_digest = owners_by_digest

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        entries = [(entry, "MMAUDIO_API_KEYS") for entry in settings.api_keys]
        if settings.api_keys_file is not None:
            lines = Path(settings.api_keys_file).read_text().splitlines()
            entries += [(line, str(settings.api_keys_file)) for line in lines if line.split("#")[0].strip()]
        return cls(dict(_parse_entry(entry.split("#")[0], source) for entry, source in entries))

    @property
    def enabled(self) -> bool:
        return bool(self.owners_by_digest)

    def owner(self, authorization: str | None) -> str:
        """The owner behind an ``Authorization`` header; raises 401 when keys are on and it is missing or unknown."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ProblemError(
                "unauthorized", "Send an API key as 'Authorization: Bearer <key>'.", {"WWW-Authenticate": "Bearer"}
            )
        owner = self.owners_by_digest.get(key_digest(key.strip()))
        if owner is None:
            raise ProblemError("unauthorized", "Unknown API key.", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return owner
