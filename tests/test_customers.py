"""OpenMeter's customers and subjects (issue 19, part 2): the pure decisions from tables, and
the v1 routes through the official openmeter SDK against a live gateway and nats-server."""

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from corehttp.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from nats.aio.client import Client
from openmeter.aio import Client as OpenMeter

from kloudmeter_py.config import Settings
from kloudmeter_py.core.customers import (
    Customer,
    CustomerIn,
    Listing,
    UsageAttribution,
    change,
    check_customer_in,
    is_ulid,
    list_page,
    new_ulid,
    owned_subjects,
)
from kloudmeter_py.errors import InvalidInput
from kloudmeter_py.store.customers import CustomerStore
from kloudmeter_py.store.layout import Layout
from tests.helpers import Http

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _client(http: Http, token: str | None = None) -> Any:
    """The SDK's client (typed Any: its shadowed operation classes confuse mypy)."""
    return OpenMeter(endpoint=str(http.make_url("")).rstrip("/"), token=token, retry_total=0)


def _problem(err: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    response: Any = err.value.response
    assert response is not None
    body: dict[str, Any] = response.json()
    return body


# -- pure decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "subject_keys", "owned"),
    [
        ("acme", [], ["acme"]),
        (None, ["a", "b"], ["a", "b"]),
        ("acme", ["acme-1", "acme", "acme-2", "acme-1"], ["acme", "acme-1", "acme-2"]),
        (None, [], []),
    ],
)
def test_a_customer_owns_its_key_and_its_subject_keys(
    key: str | None, subject_keys: list[str], owned: list[str]
) -> None:
    """Usage is attributed by the key and by each subject key, each subject once."""
    assert owned_subjects(key, subject_keys) == owned


def test_a_customer_without_key_or_subjects_is_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        check_customer_in(CustomerIn(name="x", usageAttribution=UsageAttribution(subjectKeys=[])))
    assert err.value.field == "key"


@pytest.mark.parametrize(
    ("before", "after", "claim", "release", "keep"),
    [
        (["a", "b"], ["b", "c"], ("c",), ("a",), ("b",)),
        ([], ["a"], ("a",), (), ()),
        (["a"], [], (), ("a",), ()),
        (["a", "b"], ["a", "b"], (), (), ("a", "b")),
    ],
)
def test_a_change_claims_new_subjects_and_releases_dropped_ones(
    before: list[str],
    after: list[str],
    claim: tuple[str, ...],
    release: tuple[str, ...],
    keep: tuple[str, ...],
) -> None:
    steps = change(before, after)
    assert (steps.claim, steps.release, steps.keep) == (claim, release, keep)


def test_ulids_are_26_crockford_characters_in_time_order() -> None:
    a = new_ulid(1_700_000_000_000, bytes(10))
    b = new_ulid(1_700_000_000_001, bytes(10))
    assert is_ulid(a) and is_ulid(b) and len(a) == 26 and a < b
    assert new_ulid(0, bytes(10)) == "0" * 26
    assert new_ulid((1 << 48) - 1, b"\xff" * 10) == "7" + "Z" * 25


def _c(
    i: int, name: str, key: str | None, subjects: list[str], email: str | None = None
) -> Customer:
    return Customer(
        id=f"01J{i:023d}",
        name=name,
        key=key,
        usageAttribution=UsageAttribution(subjectKeys=subjects),
        primaryEmail=email,
        createdAt=T0 + timedelta(days=10 - i),
        updatedAt=T0,
    )


_ALL = [
    _c(1, "Acme", "acme", ["acme-web"], "ops@acme.test"),
    _c(2, "Globex", "globex", ["gx-1", "gx-2"]),
    _c(3, "Initech", None, ["ini"], "it@initech.test"),
]


@pytest.mark.parametrize(
    ("listing", "ids", "total"),
    [
        (Listing(), [1, 2, 3], 3),
        (Listing(order="DESC"), [3, 2, 1], 3),
        (Listing(order_by="createdAt"), [3, 2, 1], 3),
        (Listing(order_by="name", order="DESC"), [3, 2, 1], 3),
        (Listing(key="ACM"), [1], 1),
        (Listing(name="glo"), [2], 1),
        (Listing(primary_email=".TEST"), [1, 3], 2),
        (Listing(subject="gx-2"), [2], 1),
        (Listing(subject="acme"), [1], 1),  # its key counts as one of its subjects
        (Listing(page=2, page_size=2), [3], 3),
        (Listing(page=3, page_size=2), [], 3),
    ],
)
def test_listing_filters_orders_and_pages(listing: Listing, ids: list[int], total: int) -> None:
    page = list_page(_ALL, listing)
    assert [int(c.id[3:]) for c in page.items] == ids
    assert (page.totalCount, page.page, page.pageSize) == (total, listing.page, listing.page_size)


# -- through the SDK -------------------------------------------------------------------------


async def test_customers_through_the_sdk(http: Http) -> None:
    """Create, get by id and by key, list with filters and pages, replace, delete."""
    async with _client(http) as om:
        acme = await om.customers.create(
            {
                "name": "ACME Inc.",
                "key": "acme",
                "description": "a customer",
                "usageAttribution": {"subjectKeys": ["acme-web", "acme-api"]},
                "primaryEmail": "ops@acme.test",
                "currency": "EUR",
                "metadata": {"tier": "gold"},
            }
        )
        assert is_ulid(acme.id) and acme.key == "acme" and acme.currency == "EUR"
        assert acme.usage_attribution is not None
        assert acme.usage_attribution.subject_keys == ["acme-web", "acme-api"]
        assert acme.created_at == acme.updated_at
        globex = await om.customers.create(
            {"name": "Globex", "usageAttribution": {"subjectKeys": ["gx"]}}
        )
        assert globex.key is None

        by_id = await om.customers.get(acme.id)
        by_key = await om.customers.get("acme")
        assert by_id.id == by_key.id == acme.id and by_key.metadata == {"tier": "gold"}

        page = await om.customers.list()
        assert page.total_count == 2 and page.page == 1 and page.page_size == 100
        assert sorted(c.name for c in page.items_property) == ["ACME Inc.", "Globex"]
        only = await om.customers.list(subject="GX")
        assert [c.id for c in only.items_property] == [globex.id]
        paged = await om.customers.list(page=2, page_size=1, order_by="name")
        assert [c.name for c in paged.items_property] == ["Globex"]
        assert (await om.customers.list(plan_key="pro")).total_count == 0

        updated = await om.customers.update(
            "acme",
            {
                "name": "ACME",
                "key": "acme",
                "usageAttribution": {"subjectKeys": ["acme-api", "acme-new"]},
            },
        )
        assert updated.id == acme.id and updated.name == "ACME"
        assert updated.description is None  # replaced, not merged
        assert updated.created_at == acme.created_at and updated.updated_at > acme.updated_at
        # acme-web is free again: another customer may take it.
        await om.customers.create(
            {"name": "Web", "usageAttribution": {"subjectKeys": ["acme-web"]}}
        )

        await om.customers.delete(acme.id)
        with pytest.raises(ResourceNotFoundError):
            await om.customers.get(acme.id)
        with pytest.raises(ResourceNotFoundError):
            await om.customers.get("acme")
        with pytest.raises(ResourceNotFoundError):
            await om.customers.delete("acme")
        # Its subjects and key are free again.
        again = await om.customers.create(
            {"name": "ACME again", "key": "acme", "usageAttribution": {"subjectKeys": ["acme-api"]}}
        )
        assert again.id != acme.id


async def test_a_subject_belongs_to_at_most_one_customer(http: Http) -> None:
    """A second customer naming a subject, or a key, another owns: 409 naming the field."""
    async with _client(http) as om:
        await om.customers.create(
            {"name": "A", "key": "a", "usageAttribution": {"subjectKeys": ["s1", "s2"]}}
        )
        cases: list[tuple[dict[str, Any], str]] = [
            (
                {"name": "B", "usageAttribution": {"subjectKeys": ["s3", "s2"]}},
                "usageAttribution.subjectKeys",
            ),
            ({"name": "B", "key": "s1"}, "key"),  # a key is a subject too
            ({"name": "B", "key": "a"}, "key"),  # the same key
            (
                {"name": "B", "usageAttribution": {"subjectKeys": ["a"]}},
                "usageAttribution.subjectKeys",
            ),
        ]
        for body, field in cases:
            with pytest.raises(ResourceExistsError) as err:
                await om.customers.create(body)
            problem = _problem(err)
            assert problem["status"] == 409 and problem["field"] == field, body
            assert "belongs to customer" in problem["detail"]
        # Nothing of a refused customer stays claimed: s3 is free.
        await om.customers.create({"name": "C", "usageAttribution": {"subjectKeys": ["s3"]}})
        # A replace naming another's subject is refused the same, and changes nothing.
        b = await om.customers.create({"name": "B", "key": "b"})
        with pytest.raises(ResourceExistsError):
            await om.customers.update(
                b.id, {"name": "B", "key": "b", "usageAttribution": {"subjectKeys": ["s1"]}}
            )
        assert (await om.customers.get("b")).usage_attribution.subject_keys == []
        with pytest.raises(HttpResponseError) as bad:
            await om.customers.create({"name": "D"})
        assert bad.value.status_code == 400 and _problem(bad)["field"] == "key"
        with pytest.raises(HttpResponseError) as bad:
            await om.customers.create({"name": "D", "key": "d", "currency": "euro"})
        assert bad.value.status_code == 400 and _problem(bad)["field"] == "currency"


async def test_an_abandoned_claim_is_taken_over_after_the_grace(
    nc: Client, settings: Settings
) -> None:
    """A claim whose customer never wrote its record (a crash between the steps) blocks the
    subject while it is fresh, and is taken over once older than the grace."""
    store = CustomerStore(nc.jetstream(), Layout(settings))
    kv = await store.kv()
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    ghost = new_ulid(now_ms, bytes(10))
    await kv.put("owner.fresh", msgspec.json.encode({"customer": ghost, "at": now_ms}))
    await kv.put("owner.stale", msgspec.json.encode({"customer": ghost, "at": now_ms - 60_000}))
    with pytest.raises(Exception) as err:
        await store.create(CustomerIn(name="x", key="fresh"))
    assert getattr(err.value, "status", None) == 409
    made = await store.create(CustomerIn(name="y", key="stale"))
    assert await store.subjects_of("stale") == ["stale"] and made.key == "stale"


async def test_subjects_of_is_tenant_aware(nc: Client, settings: Settings) -> None:
    """By id or key; another tenant's customer answers like an unknown one (None)."""
    store = CustomerStore(nc.jetstream(), Layout(settings))
    acme = await store.create(
        CustomerIn(name="A", key="acme", usageAttribution=UsageAttribution(subjectKeys=["w", "x"]))
    )
    await store.create(CustomerIn(name="G", key="globex"))
    assert await store.subjects_of(acme.id) == ["acme", "w", "x"]
    assert await store.subjects_of("acme", tenant="acme") == ["acme", "w", "x"]
    assert await store.subjects_of("globex", tenant="acme") is None
    assert await store.subjects_of("nobody") is None
    assert await store.tenant_subjects("acme") == ["acme", "w", "x"]
    assert await store.tenant_subjects("w") == ["w"]  # a subject, not a customer's key


async def test_subjects_through_the_sdk(http: Http) -> None:
    """Upsert (create, then a partial update), list, get by key and id, delete."""
    async with _client(http) as om:
        made = await om.subjects.upsert(
            [{"key": "s-1", "displayName": "One", "metadata": {"a": 1}}, {"key": "s 2"}]
        )
        assert [s.key for s in made] == ["s-1", "s 2"] and all(is_ulid(s.id) for s in made)
        again = await om.subjects.upsert([{"key": "s-1", "displayName": "Uno"}])
        assert again[0].id == made[0].id and again[0].display_name == "Uno"
        assert again[0].metadata == {"a": 1}  # kept: not sent
        assert [s.key for s in await om.subjects.list()] == ["s 2", "s-1"]
        assert (await om.subjects.get("s 2")).id == made[1].id
        assert (await om.subjects.get(made[0].id)).key == "s-1"
        await om.subjects.delete("s-1")
        with pytest.raises(ResourceNotFoundError):
            await om.subjects.get("s-1")
        assert [s.key for s in await om.subjects.list()] == ["s 2"]
