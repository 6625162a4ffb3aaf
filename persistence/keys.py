"""API keys: a random token shown once; the database keeps only its sha256.

A plain (unsalted) sha256 is enough here because the token carries 256 random bits: there
is nothing to brute-force, and an indexed lookup by hash stays one query per request.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from svdforge.persistence.ids import new_id
from svdforge.persistence.tables import ApiKey, utcnow

TOKEN_PREFIX = "svdf_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the token (the only time it exists in clear)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("key name must be 1 to 100 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=new_id("key"), name=name, prefix=token[:12], key_hash=hash_token(token))
    session.add(key)
    session.flush()
    return key, token


def find_key(session: Session, token: str) -> ApiKey | None:
    """The active key for `token`, or None (unknown or revoked)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if key is None or key.revoked_at is not None or not hmac.compare_digest(key.key_hash, digest):
        return None
    return key


def revoke_key(session: Session, key_id: str, now: datetime | None = None) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = now or utcnow()
    return True
