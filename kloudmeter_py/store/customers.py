"""Customers and subjects (OpenMeter's v1) in the ``customers`` KV bucket.

Keys:

- ``customer.<id>`` -> the customer (core.customers.Customer, JSON); ids are ULIDs.
- ``owner.<subject token>`` -> the claim of one subject by a customer:
  ``{"customer": id, "at": ms}``. Every subject a customer owns (its key and its
  ``usageAttribution.subjectKeys``, core.customers.subjects_of) has one; it is created
  with a compare-and-set, so two customers never claim the same subject, and looking a
  customer up by key reads its key's claim.
- ``subject.<subject token>`` -> a subject entity (core.customers.Subject) of
  ``/api/v1/subjects``, kept apart from the claims (OpenMeter's subjects are labels).

Subject tokens are core.keys.encode_token of the subject key (any text, reversibly).

A customer's record is the truth of what it owns: readers (``subjects_of``) read the
record only. Claims only keep two customers from owning one subject. A change claims new
subjects first, then writes the record (compare-and-set on its revision), then releases
subjects no longer owned, then checks its new claims are still its own (undoing the change
with 409 if one was taken meanwhile). A claim whose customer's record does not list the
subject (a crash between the steps) is taken over by the next customer that asks for the
subject, once it is ``CLAIM_GRACE_S`` old (so a change in progress is not robbed between its
claim and its write).

Deleting a customer removes its record, then its claims (OpenMeter keeps deleted customers
with ``deletedAt``; here they are gone, and ``includeDeleted`` lists nothing more).
"""

import os
import time
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kloudmeter_py.core.customers import (
    Customer,
    CustomerIn,
    Subject,
    SubjectUpsert,
    change,
    check_customer_in,
    conflict_field,
    customer_from,
    is_ulid,
    new_ulid,
    subjects_of,
    upsert_subject,
)
from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.errors import Conflict, NotFound
from kloudmeter_py.store.kv import get_with_revision, scan
from kloudmeter_py.store.layout import Layout

CLAIM_GRACE_S = 30.0
_RETRIES = 8


class _Claim(msgspec.Struct):
    customer: str
    at: int  # ms since the epoch


_customer_decoder = msgspec.json.Decoder(Customer)
_claim_decoder = msgspec.json.Decoder(_Claim)
_subject_decoder = msgspec.json.Decoder(Subject)


def new_id(now: datetime | None = None) -> str:
    """A new ULID for now."""
    t = now or datetime.now(UTC)
    return new_ulid(int(t.timestamp() * 1000), os.urandom(10))


def _owner_key(subject: str) -> str:
    return f"owner.{encode_token(subject)}"


def _customer_key(customer_id: str) -> str:
    return f"customer.{customer_id}"


def _subject_key(key: str) -> str:
    return f"subject.{encode_token(key)}"


class CustomerStore:
    """Customers, their subjects' claims, and subject entities (see the module docstring)."""

    def __init__(self, js: JetStreamContext, layout: Layout) -> None:
        self.js = js
        self.layout = layout
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.layout.customers_bucket)
        return self._kv

    # -- reads ------------------------------------------------------------------------------

    async def _record(self, customer_id: str) -> tuple[Customer | None, int]:
        if not is_ulid(customer_id):
            return None, 0
        value, revision = await get_with_revision(await self.kv(), _customer_key(customer_id))
        return (None if value is None else _customer_decoder.decode(value)), revision

    async def _claim(self, subject: str) -> tuple[_Claim | None, int]:
        value, revision = await get_with_revision(await self.kv(), _owner_key(subject))
        return (None if value is None else _claim_decoder.decode(value)), revision

    async def by_key(self, key: str) -> Customer | None:
        """The customer whose key is ``key`` (its key's claim names it), or None."""
        claim, _ = await self._claim(key)
        if claim is None:
            return None
        customer, _ = await self._record(claim.customer)
        return customer if customer is not None and customer.key == key else None

    async def find(self, id_or_key: str) -> Customer | None:
        """The customer with this id, else the one with this key (OpenMeter's
        ULIDOrExternalKey), or None."""
        customer, _ = await self._record(id_or_key)
        return customer if customer is not None else await self.by_key(id_or_key)

    async def get(self, id_or_key: str, *, tenant: str | None = None) -> Customer:
        """``find``, narrowed to ``tenant`` (a user's: only the customer whose key is its
        tenant); 404 otherwise, as for an unknown customer."""
        customer = await self.find(id_or_key)
        if customer is None or (tenant is not None and customer.key != tenant):
            raise NotFound(f"customer {id_or_key!r} not found", field="customerIdOrKey")
        return customer

    async def list_customers(self) -> list[Customer]:
        found = await scan(self.js, self.layout.customers_bucket, "customer.*")
        return [_customer_decoder.decode(v) for _, v in found]

    async def subjects_of(self, id_or_key: str, *, tenant: str | None = None) -> list[str] | None:
        """The subjects a customer owns (its key first, then its subject keys), by its id or
        key; None for an unknown customer, and for another tenant's: with ``tenant`` (a
        user's tenant), only the customer whose key is that tenant answers.

        This is what other modules call to turn a customer into the subjects its usage is
        counted under (meter queries' ``filterCustomerId``, entitlements, alerts)."""
        customer = await self.find(id_or_key)
        if customer is None or (tenant is not None and customer.key != tenant):
            return None
        return subjects_of(customer)

    async def tenant_subjects(self, tenant: str) -> list[str]:
        """The subjects a user whose tenant is ``tenant`` acts for: the customer's whose
        key it is, or the one subject named so when no customer has that key."""
        customer = await self.by_key(tenant)
        return [tenant] if customer is None else subjects_of(customer)

    # -- claims -----------------------------------------------------------------------------

    async def _take(self, subject: str, customer_id: str, now_ms: int) -> str | None:
        """Claim ``subject`` for the customer; the id of the customer that owns it instead."""
        kv = await self.kv()
        value = msgspec.json.encode(_Claim(customer=customer_id, at=now_ms))
        for _ in range(_RETRIES):
            claim, revision = await self._claim(subject)
            try:
                if claim is None:
                    await kv.create(_owner_key(subject), value)
                    return None
                if claim.customer == customer_id:
                    return None
                owner, _ = await self._record(claim.customer)
                if owner is not None and subject in subjects_of(owner):
                    return claim.customer
                if now_ms - claim.at < CLAIM_GRACE_S * 1000:
                    return claim.customer  # a change in progress, maybe: not taken yet
                await kv.update(_owner_key(subject), value, last=revision)
                return None
            except KeyWrongLastSequenceError:
                continue
        raise Conflict(f"subject {subject!r} is being changed; retry", field="subject")

    async def _release(self, subjects: tuple[str, ...] | list[str], customer_id: str) -> None:
        """Drop the customer's claims of ``subjects`` (a claim another customer holds stays)."""
        kv = await self.kv()
        for subject in subjects:
            claim, revision = await self._claim(subject)
            if claim is None or claim.customer != customer_id:
                continue
            try:
                await kv.delete(_owner_key(subject), last=revision)
            except KeyWrongLastSequenceError:
                pass  # changed meanwhile: no longer this customer's to drop

    async def _claim_all(
        self, subjects: tuple[str, ...], customer_id: str, body_key: str | None
    ) -> None:
        """Claim every subject or none: 409 naming the field and the owner otherwise."""
        now_ms = int(time.time() * 1000)
        taken: list[str] = []
        for subject in subjects:
            owner = await self._take(subject, customer_id, now_ms)
            if owner is not None:
                await self._release(taken, customer_id)
                raise Conflict(
                    f"subject {subject!r} belongs to customer {owner}: a subject is "
                    "attributed to at most one customer",
                    field=conflict_field(subject, body_key),
                )
            taken.append(subject)

    async def _still_ours(self, subjects: tuple[str, ...], customer_id: str) -> str | None:
        """The first of ``subjects`` whose claim is no longer the customer's, or None."""
        for subject in subjects:
            claim, _ = await self._claim(subject)
            if claim is None or claim.customer != customer_id:
                return subject
        return None

    # -- writes -----------------------------------------------------------------------------

    async def create(self, body: CustomerIn) -> Customer:
        """A new customer (201), or 409 naming ``key`` or ``usageAttribution.subjectKeys``
        when a subject it would own is another customer's (its key counts as a subject)."""
        owned = tuple(check_customer_in(body))
        now = datetime.now(UTC)
        if body.key is not None and is_ulid(body.key):
            other, _ = await self._record(body.key)
            if other is not None:
                raise Conflict(f"key {body.key!r} is another customer's id", field="key")
        customer = customer_from(body, id=new_id(now), created=now, updated=now)
        await self._claim_all(owned, customer.id, body.key)
        kv = await self.kv()
        revision = await kv.create(_customer_key(customer.id), msgspec.json.encode(customer))
        lost = await self._still_ours(owned, customer.id)
        if lost is not None:
            await self._undo_create(customer, revision)
            raise Conflict(
                f"subject {lost!r} was claimed meanwhile", field=conflict_field(lost, body.key)
            )
        return customer

    async def _undo_create(self, customer: Customer, revision: int) -> None:
        kv = await self.kv()
        try:
            await kv.delete(_customer_key(customer.id), last=revision)
        except KeyWrongLastSequenceError:
            pass
        await self._release(subjects_of(customer), customer.id)

    async def replace(self, id_or_key: str, body: CustomerIn) -> Customer:
        """PUT: the customer becomes ``body`` (id and creation time kept); subjects it no
        longer names are released, new ones claimed (409 as for ``create``)."""
        owned = tuple(check_customer_in(body))
        kv = await self.kv()
        for _ in range(_RETRIES):
            current = await self.get(id_or_key)
            before, revision = await self._record(current.id)
            if before is None:
                continue
            if body.key is not None and body.key != before.key and is_ulid(body.key):
                other, _ = await self._record(body.key)
                if other is not None:
                    raise Conflict(f"key {body.key!r} is another customer's id", field="key")
            steps = change(subjects_of(before), owned)
            await self._claim_all(steps.claim, before.id, body.key)
            after = customer_from(
                body, id=before.id, created=before.createdAt, updated=datetime.now(UTC)
            )
            try:
                written = await kv.update(
                    _customer_key(before.id), msgspec.json.encode(after), last=revision
                )
            except KeyWrongLastSequenceError:
                await self._release(steps.claim, before.id)
                continue  # changed meanwhile: again from what is there now
            await self._release(steps.release, before.id)
            lost = await self._still_ours(steps.claim, before.id)
            if lost is not None:
                try:
                    await kv.update(
                        _customer_key(before.id), msgspec.json.encode(before), last=written
                    )
                except KeyWrongLastSequenceError:
                    pass
                await self._release(steps.claim, before.id)
                raise Conflict(
                    f"subject {lost!r} was claimed meanwhile", field=conflict_field(lost, body.key)
                )
            return after
        raise Conflict("the customer is being changed; retry", field="customerIdOrKey")

    async def delete(self, id_or_key: str) -> None:
        """Remove the customer, then its claims (its subjects are free again)."""
        kv = await self.kv()
        for _ in range(_RETRIES):
            current = await self.get(id_or_key)
            _, revision = await self._record(current.id)
            try:
                await kv.delete(_customer_key(current.id), last=revision)
            except KeyWrongLastSequenceError:
                continue
            await self._release(subjects_of(current), current.id)
            return
        raise Conflict("the customer is being changed; retry", field="customerIdOrKey")

    # -- subject entities -------------------------------------------------------------------

    async def list_subjects(self) -> list[Subject]:
        found = await scan(self.js, self.layout.customers_bucket, "subject.*")
        subjects = [_subject_decoder.decode(v) for _, v in found]
        return sorted(subjects, key=lambda s: s.key)

    async def get_subject(self, id_or_key: str) -> Subject:
        """A subject entity by key, else by id; 404 naming ``subjectIdOrKey``."""
        value, _ = await get_with_revision(await self.kv(), _subject_key(id_or_key))
        if value is not None:
            return _subject_decoder.decode(value)
        if is_ulid(id_or_key):
            for subject in await self.list_subjects():
                if subject.id == id_or_key:
                    return subject
        raise NotFound(f"subject {id_or_key!r} not found", field="subjectIdOrKey")

    async def upsert_subjects(self, bodies: list[SubjectUpsert]) -> list[Subject]:
        """Create or partly update each subject (compare-and-set per subject)."""
        kv = await self.kv()
        out = []
        for body in bodies:
            for _ in range(_RETRIES):
                value, revision = await get_with_revision(kv, _subject_key(body.key))
                stored = None if value is None else _subject_decoder.decode(value)
                now = datetime.now(UTC)
                subject = upsert_subject(stored, body, new_id=new_id(now), now=now)
                data = msgspec.json.encode(subject)
                try:
                    if stored is None:
                        await kv.create(_subject_key(body.key), data)
                    else:
                        await kv.update(_subject_key(body.key), data, last=revision)
                except KeyWrongLastSequenceError:
                    continue
                out.append(subject)
                break
            else:
                raise Conflict(f"subject {body.key!r} is being changed; retry", field="key")
        return out

    async def delete_subject(self, id_or_key: str) -> None:
        subject = await self.get_subject(id_or_key)
        await (await self.kv()).delete(_subject_key(subject.key))
