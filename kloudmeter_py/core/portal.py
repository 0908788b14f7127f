"""Portal tokens (OpenMeter's consumer portal): the models and the pure decisions (when a
token expires, whether it is usable, what it may read)."""

from datetime import datetime, timedelta
from typing import Annotated

import msgspec
from msgspec import Meta

from kloudmeter_py.core.models import AwareTime, MeterId
from kloudmeter_py.errors import Forbidden, InvalidInput

DEFAULT_LIFETIME = timedelta(hours=1)  # OpenMeter's default (portal.tokenExpiration)
MAX_LIFETIME = timedelta(days=366)
LIST_DEFAULT, LIST_MAX = 25, 100  # GET /api/v1/portal/tokens' limit (OpenMeter's)


class PortalTokenIn(msgspec.Struct, kw_only=True):
    """Body of POST /api/v1/portal/tokens (OpenMeter's PortalToken: read-only fields sent
    are ignored, as unknown ones are)."""

    subject: Annotated[str, Meta(min_length=1, max_length=256)]
    allowedMeterSlugs: Annotated[list[MeterId], Meta(min_length=1, max_length=100)] | None = None
    expiresAt: AwareTime | None = None


class PortalTokenRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A token as stored: never the token itself, its SHA-256."""

    id: str
    subject: str
    allowedMeterSlugs: list[str] | None = None
    expiresAt: datetime
    createdAt: datetime
    tokenHash: str
    invalidatedAt: datetime | None = None


class PortalToken(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A token as the API shows it (OpenMeter's PortalToken); ``token`` only at creation."""

    id: str
    subject: str
    expiresAt: datetime
    expired: bool
    createdAt: datetime
    allowedMeterSlugs: list[str] | None = None
    token: str | None = None


class InvalidateIn(msgspec.Struct, kw_only=True):
    """Body of POST /api/v1/portal/tokens/invalidate: a token's id, a subject (all its
    tokens), or both."""

    id: str | None = None
    subject: str | None = None


def expiry(asked: datetime | None, now: datetime) -> datetime:
    """When a new token expires: ``asked`` (in the future, within MAX_LIFETIME), or
    DEFAULT_LIFETIME from now."""
    if asked is None:
        return now + DEFAULT_LIFETIME
    if asked <= now:
        raise InvalidInput("expiresAt: must be in the future", field="expiresAt")
    if asked - now > MAX_LIFETIME:
        raise InvalidInput(
            f"expiresAt: at most {MAX_LIFETIME.days} days from now", field="expiresAt"
        )
    return asked


def usable(record: PortalTokenRecord, now: datetime) -> bool:
    """Not invalidated and not expired (a token expires at its expiresAt)."""
    return record.invalidatedAt is None and now < record.expiresAt


def view(record: PortalTokenRecord, now: datetime, token: str | None = None) -> PortalToken:
    return PortalToken(
        id=record.id,
        subject=record.subject,
        expiresAt=record.expiresAt,
        expired=not usable(record, now),
        createdAt=record.createdAt,
        allowedMeterSlugs=record.allowedMeterSlugs,
        token=token,
    )


def check_meter(record: PortalTokenRecord, slug: str) -> None:
    """403 naming meterSlug when the token may not read meter ``slug``."""
    if record.allowedMeterSlugs is not None and slug not in record.allowedMeterSlugs:
        raise Forbidden(f"this portal token may not read meter {slug!r}", field="meterSlug")
