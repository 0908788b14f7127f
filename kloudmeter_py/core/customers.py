"""Customers and subjects on OpenMeter's v1 wire: the models, and the pure decisions about
them (which subjects a customer owns, what a change claims and releases, listing).

A customer owns the subjects its usage is attributed to: its ``key`` (when it has one) and
every ``usageAttribution.subjectKeys`` entry, as OpenMeter attributes usage by both. A
subject belongs to at most one customer (store.customers keeps one claim per subject).
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from kloudmeter_py.errors import InvalidInput

# OpenMeter's ULID (Crockford base32, 26 characters, the first at most 7).
ULID_PATTERN = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"
_ULID = re.compile(ULID_PATTERN)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

Key = Annotated[str, Meta(min_length=1, max_length=256)]
SubjectKey = Annotated[str, Meta(min_length=1, max_length=256)]
MAX_SUBJECTS = 1000  # subject keys of one customer


def new_ulid(ms: int, rand: bytes) -> str:
    """A ULID: 48 bits of milliseconds since the epoch, then 80 random bits."""
    if len(rand) != 10 or not 0 <= ms < 1 << 48:
        raise ValueError("a ULID takes 48 bits of time and 10 random bytes")
    n = (ms << 80) | int.from_bytes(rand, "big")
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in range(25, -1, -1))


def is_ulid(value: str) -> bool:
    return _ULID.fullmatch(value) is not None


class UsageAttribution(msgspec.Struct):
    """The subjects whose usage is the customer's (besides its key)."""

    subjectKeys: Annotated[list[SubjectKey], Meta(max_length=MAX_SUBJECTS)]


class Address(msgspec.Struct, omit_defaults=True):
    country: Annotated[str, Meta(pattern="^[A-Z]{2}$")] | None = None
    postalCode: str | None = None
    state: str | None = None
    city: str | None = None
    line1: str | None = None
    line2: str | None = None
    phoneNumber: str | None = None


Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$")]


class CustomerIn(msgspec.Struct, kw_only=True):
    """Body of POST /api/v1/customers (CustomerCreate) and PUT .../{idOrKey}
    (CustomerReplaceUpdate: the whole customer). Read-only fields sent back (id, times)
    and unknown fields are ignored; null is absent. Either ``key`` or at least one subject
    key is needed."""

    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: Annotated[str, Meta(max_length=1024)] | None = None
    metadata: dict[str, str] | None = None
    key: Key | None = None
    usageAttribution: UsageAttribution | None = None
    primaryEmail: str | None = None
    currency: Currency | None = None
    billingAddress: Address | None = None


class Customer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A customer as stored and answered (OpenMeter's Customer; absent fields left out)."""

    id: str
    name: str
    description: str | None = None
    metadata: dict[str, str] | None = None
    key: str | None = None
    usageAttribution: UsageAttribution = msgspec.field(
        default_factory=lambda: UsageAttribution(subjectKeys=[])
    )
    primaryEmail: str | None = None
    currency: str | None = None
    billingAddress: Address | None = None
    createdAt: datetime
    updatedAt: datetime


class CustomerPage(msgspec.Struct):
    """GET /api/v1/customers (OpenMeter's CustomerPaginatedResponse)."""

    totalCount: int
    page: int
    pageSize: int
    items: list[Customer]


def owned_subjects(key: str | None, subject_keys: Iterable[str]) -> list[str]:
    """The subjects a customer owns: its key first (usage is attributed to it too), then
    its subject keys, each once."""
    return list(dict.fromkeys([*([key] if key is not None else []), *subject_keys]))


def subjects_of(customer: Customer) -> list[str]:
    return owned_subjects(customer.key, customer.usageAttribution.subjectKeys)


def check_customer_in(body: CustomerIn) -> list[str]:
    """The subjects ``body`` asks the customer to own; 400 when it names none."""
    keys = body.usageAttribution.subjectKeys if body.usageAttribution else []
    owned = owned_subjects(body.key, keys)
    if not owned:
        raise InvalidInput(
            "a customer needs a key or at least one usageAttribution.subjectKeys entry "
            "(its usage is attributed by them)",
            field="key",
        )
    return owned


def customer_from(body: CustomerIn, *, id: str, created: datetime, updated: datetime) -> Customer:
    """The stored customer ``body`` describes (subject keys each once, in order)."""
    keys = body.usageAttribution.subjectKeys if body.usageAttribution else []
    return Customer(
        id=id,
        name=body.name,
        description=body.description,
        metadata=body.metadata,
        key=body.key,
        usageAttribution=UsageAttribution(subjectKeys=list(dict.fromkeys(keys))),
        primaryEmail=body.primaryEmail,
        currency=body.currency,
        billingAddress=body.billingAddress,
        createdAt=created,
        updatedAt=updated,
    )


@dataclass(frozen=True)
class Change:
    """What replacing a customer's subjects does to the claims: subjects to claim (new),
    to release (no longer owned), and kept."""

    claim: tuple[str, ...]
    release: tuple[str, ...]
    keep: tuple[str, ...]


def change(before: Sequence[str], after: Sequence[str]) -> Change:
    old, new = set(before), set(after)
    return Change(
        claim=tuple(s for s in after if s not in old),
        release=tuple(s for s in before if s not in new),
        keep=tuple(s for s in after if s in old),
    )


def conflict_field(subject: str, body_key: str | None) -> str:
    """The input field naming a subject another customer owns."""
    return "key" if subject == body_key else "usageAttribution.subjectKeys"


@dataclass(frozen=True)
class Listing:
    """GET /api/v1/customers' parameters: filters (case-insensitive parts), order, page."""

    page: int = 1
    page_size: int = 100
    order: Literal["ASC", "DESC"] = "ASC"
    order_by: Literal["id", "name", "createdAt"] = "id"
    key: str | None = None
    name: str | None = None
    primary_email: str | None = None
    subject: str | None = None


def _has(value: str | None, part: str | None) -> bool:
    return part is None or (value is not None and part.lower() in value.lower())


def list_page(customers: Iterable[Customer], listing: Listing) -> CustomerPage:
    """The page of customers that pass the filters, in the order asked (ties by id)."""
    kept = [
        c
        for c in customers
        if _has(c.key, listing.key)
        and _has(c.name, listing.name)
        and _has(c.primaryEmail, listing.primary_email)
        and (listing.subject is None or any(_has(s, listing.subject) for s in subjects_of(c)))
    ]
    by: dict[str, Any] = {
        "id": lambda c: c.id,
        "name": lambda c: (c.name, c.id),
        "createdAt": lambda c: (c.createdAt, c.id),
    }
    kept.sort(key=by[listing.order_by], reverse=listing.order == "DESC")
    start = (listing.page - 1) * listing.page_size
    return CustomerPage(
        totalCount=len(kept),
        page=listing.page,
        pageSize=listing.page_size,
        items=kept[start : start + listing.page_size],
    )


# -- subjects (OpenMeter's /api/v1/subjects) -------------------------------------------------


class Subject(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A subject as stored and answered (OpenMeter's Subject)."""

    id: str
    key: str
    displayName: str | None = None
    metadata: dict[str, Any] | None = None
    currentPeriodStart: datetime | None = None
    currentPeriodEnd: datetime | None = None
    stripeCustomerId: str | None = None
    createdAt: datetime
    updatedAt: datetime


class SubjectUpsert(msgspec.Struct, kw_only=True):
    """One entry of POST /api/v1/subjects: a field given replaces the stored one (null
    clears it), a field left out keeps it."""

    key: SubjectKey
    displayName: str | UnsetType | None = UNSET
    metadata: dict[str, Any] | UnsetType | None = UNSET
    currentPeriodStart: datetime | UnsetType | None = UNSET
    currentPeriodEnd: datetime | UnsetType | None = UNSET
    stripeCustomerId: str | UnsetType | None = UNSET


_UPSERTED = (
    "displayName",
    "metadata",
    "currentPeriodStart",
    "currentPeriodEnd",
    "stripeCustomerId",
)


def upsert_subject(
    stored: Subject | None, body: SubjectUpsert, *, new_id: str, now: datetime
) -> Subject:
    """The subject after ``body`` is applied to ``stored`` (None: a new one)."""
    if stored is None:
        stored = Subject(id=new_id, key=body.key, createdAt=now, updatedAt=now)
    changes: dict[str, Any] = {
        name: getattr(body, name) for name in _UPSERTED if getattr(body, name) is not UNSET
    }
    return msgspec.structs.replace(stored, **changes, updatedAt=now)
