"""API key format: ``pf-<43 urlsafe chars>`` (256 random bits); only its SHA-256 is stored."""
from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "pf-"
DISPLAY_CHARS = 11  # "pf-" and the first 8 random characters
MAX_KEY_LENGTH = 256


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def display_prefix(api_key: str) -> str:
    """The part of a key that may be shown again (lists, logs) to tell keys apart."""
    return api_key[:DISPLAY_CHARS]


def looks_like_api_key(api_key: str) -> bool:
    """A cheap shape check before any database lookup."""
    return (isinstance(api_key, str) and api_key.startswith(KEY_PREFIX)
            and len(KEY_PREFIX) < len(api_key) <= MAX_KEY_LENGTH and api_key.isascii())
