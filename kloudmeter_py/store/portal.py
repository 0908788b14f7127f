"""Portal tokens (OpenMeter's consumer portal) in the ``portal`` KV bucket.

A portal token lets a customer's own web page read one subject's usage of some meters, and
nothing else (gateway.portal). It is shown once, at creation; only its SHA-256 is kept.

Keys: ``token.<id>`` -> the token's record (core.portal.PortalTokenRecord: subject, allowed
meters, expiry, the hash, when it was invalidated); ``hash.<sha256 hex>`` -> the id. A
token authenticates while its hash key exists, its record is not invalidated and it has not
expired. Invalidating drops the hash key first (from then on the token opens nothing), then
marks the record (it stays listed, ``expired``).
"""

import hmac
import secrets
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.core.portal import PortalTokenRecord, usable
from kloudmeter_py.errors import NotFound
from kloudmeter_py.store.auth import hash_token
from kloudmeter_py.store.customers import new_id
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout

TOKEN_PREFIX = "km_portal_"
_record_decoder = msgspec.json.Decoder(PortalTokenRecord)


def new_portal_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class PortalStore:
    def __init__(self, js: JetStreamContext, layout: Layout) -> None:
        self.js = js
        self.layout = layout
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.layout.portal_bucket)
        return self._kv

    async def create(
        self,
        subject: str,
        allowed: list[str] | None,
        expires_at: datetime,
        now: datetime | None = None,
    ) -> tuple[PortalTokenRecord, str]:
        """A new token for ``subject`` made at ``now`` (the record, and the token shown
        this once)."""
        token = new_portal_token()
        now = now or datetime.now(UTC)
        record = PortalTokenRecord(
            id=new_id(now),
            subject=subject,
            allowedMeterSlugs=allowed,
            expiresAt=expires_at,
            createdAt=now,
            tokenHash=hash_token(token),
        )
        kv = await self.kv()
        # The record first: a hash key always finds its record.
        await kv.create(f"token.{record.id}", msgspec.json.encode(record))
        await kv.create(f"hash.{record.tokenHash}", record.id.encode())
        return record, token

    async def list_tokens(self) -> list[PortalTokenRecord]:
        """Every token's record, newest first."""
        found = await scan(self.js, self.layout.portal_bucket, "token.*")
        records = [_record_decoder.decode(v) for _, v in found]
        return sorted(records, key=lambda r: (r.createdAt, r.id), reverse=True)

    async def invalidate(self, *, token_id: str | None, subject: str | None) -> int:
        """Invalidate the token ``token_id`` (404 if unknown) and every token of
        ``subject``; how many were still usable."""
        records = await self.list_tokens()
        if token_id is not None and not any(r.id == token_id for r in records):
            raise NotFound(f"portal token {token_id!r} not found", field="id")
        now = datetime.now(UTC)
        done = 0
        for record in records:
            if record.id != token_id and (subject is None or record.subject != subject):
                continue
            if await self._invalidate(record, now):
                done += 1
        return done

    async def _invalidate(self, record: PortalTokenRecord, now: datetime) -> bool:
        kv = await self.kv()
        await kv.delete(f"hash.{record.tokenHash}")  # the token opens nothing from here on
        for _ in range(8):
            value, revision = await get_with_revision(kv, f"token.{record.id}")
            if value is None:
                return False
            current = _record_decoder.decode(value)
            if current.invalidatedAt is not None:
                return False
            marked = msgspec.structs.replace(current, invalidatedAt=now)
            try:
                await kv.update(f"token.{record.id}", msgspec.json.encode(marked), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return usable(current, now)
        return False

    async def authenticate(self, token: str) -> PortalTokenRecord | None:
        """The record of a usable token (known, not invalidated, not expired), else None."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        digest = hash_token(token)
        kv = await self.kv()
        value, _ = await get_with_revision(kv, f"hash.{digest}")
        if value is None:
            return None
        record_value, _ = await get_with_revision(kv, f"token.{value.decode()}")
        if record_value is None:
            return None
        record = _record_decoder.decode(record_value)
        if not hmac.compare_digest(record.tokenHash, digest):
            return None
        return record if usable(record, datetime.now(UTC)) else None
