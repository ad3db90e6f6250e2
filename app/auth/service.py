"""Create, list, revoke and check API keys. Keys are random; a SHA-256 hash is enough to store."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.exceptions import ApiKeyNotFound
from app.auth.models import ApiKey
from app.db.base import utcnow

KEY_PREFIX = "tdk"


class Scope(StrEnum):
    SUBMIT = "submit"
    READ = "read"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: tasks are owned by `owner`; admin sees every owner's tasks."""

    owner: str
    scopes: frozenset[Scope]
    name: str

    @property
    def admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def allows(self, scope: Scope) -> bool:
        return self.admin or scope in self.scopes


ANONYMOUS = Principal(owner="", scopes=frozenset(Scope), name="anonymous")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(*, session: Session, name: str, scopes: list[Scope]) -> tuple[ApiKey, str]:
    """A new key; the plain key is returned once and never stored."""
    prefix = secrets.token_hex(4)
    plain = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    return _store(session=session, name=name, scopes=scopes, plain=plain, prefix=prefix), plain


def ensure(*, session: Session, name: str, scopes: list[Scope], plain: str) -> ApiKey:
    """Register a key given from outside (a bootstrap secret) unless it is known already."""
    prefix = parse_prefix(plain) or _digest(plain)[:16]
    existing = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if existing is not None:
        return existing
    return _store(session=session, name=name, scopes=scopes, plain=plain, prefix=prefix)


def _store(*, session: Session, name: str, scopes: list[Scope], plain: str, prefix: str) -> ApiKey:
    key = ApiKey(
        name=name,
        prefix=prefix,
        hash=_digest(plain),
        scopes=sorted({scope.value for scope in scopes}),
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return key


def parse_prefix(plain: str) -> str | None:
    parts = plain.split("_", 2)
    if len(parts) == 3 and parts[0] == KEY_PREFIX and len(parts[1]) == 8:
        return parts[1]
    return None


def list_keys(*, session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke(*, session: Session, key: str) -> ApiKey:
    """Revoke by id or by prefix; each API process refuses it within its `KeyCache`'s time."""
    found = find(session=session, key=key)
    if found.revoked_at is None:
        found.revoked_at = utcnow()
        session.flush()
    return found


def find(*, session: Session, key: str) -> ApiKey:
    """A key by id or by prefix; ApiKeyNotFound otherwise."""
    query = select(ApiKey).where(ApiKey.prefix == key)
    found = session.scalars(query).one_or_none()
    if found is None:
        found = next((k for k in list_keys(session=session) if str(k.id) == key), None)
    if found is None:
        raise ApiKeyNotFound(key=key)
    return found


def authenticate(*, session: Session, plain: str) -> Principal | None:
    prefix = parse_prefix(plain) or _digest(plain)[:16]
    key = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.hash, _digest(plain)):
        return None
    return Principal(
        owner=str(key.id), scopes=frozenset(Scope(scope) for scope in key.scopes), name=key.name
    )


def principal_by_id(*, session: Session, key_id: str) -> Principal | None:
    """The principal of an unrevoked key by its id (a console session holds only the id)."""
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        return None
    key = session.get(ApiKey, parsed)
    if key is None or key.revoked_at is not None:
        return None
    return Principal(
        owner=str(key.id), scopes=frozenset(Scope(scope) for scope in key.scopes), name=key.name
    )


class KeyCache:
    """The principals of keys checked in the last `seconds`, so a request costs no key lookup.

    Only keys found valid are kept: a key created a moment ago works at once, and a wrong key
    is looked up (and counted as a failure) every time. A revoked key is refused once its entry
    is older than `seconds`.
    """

    def __init__(self, *, seconds: float, max_keys: int = 10_000) -> None:
        self.seconds = seconds
        self.max_keys = max_keys
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, plain: str) -> Principal | None:
        entry = self._entries.get(plain)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._entries[plain]
            return None
        return entry[0]

    def put(self, plain: str, principal: Principal) -> None:
        if self.seconds <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= self.max_keys:
            self._entries = {k: e for k, e in self._entries.items() if e[1] > now}
            if len(self._entries) >= self.max_keys:
                self._entries.clear()
        self._entries[plain] = (principal, now + self.seconds)
