"""Rating and billing: lifecycle meters, price book, records, charging filters, estimates."""

import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from nats.aio.client import Client

from kloudmeter_py.core.rating import Filter, Price, Tier, check_filters, matches, tiered_cost
from kloudmeter_py.worker import Worker
from tests.helpers import Http, create_meter, lifecycle_folded, post_event


def _price(**kw: Any) -> Price:
    base: dict[str, Any] = {
        "id": "p",
        "created_at": datetime.now(UTC),
        "name": "p",
        "currency": "EUR",
        "unit_price": Decimal("1"),
        "meter": "m",
    }
    return Price(**{**base, **kw})


@pytest.mark.parametrize(
    ("mode", "quantity", "expected"),
    [
        ("graduated", "50", "50"),  # 50 x 1
        ("graduated", "150", "125"),  # 100 x 1 + 50 x 0.5
        ("graduated", "350", "200"),  # 100 + 100 x 0.5 + 150 x 0.333.. -> see tiers
        ("volume", "50", "50"),
        ("volume", "150", "75"),  # all 150 at 0.5
        ("volume", "350", "35"),  # all 350 at 0.1
    ],
)
def test_tiered_prices(mode: str, quantity: str, expected: str) -> None:
    """Graduated tiers price each slice at its tier; volume tiers price all at one tier."""
    tiers = [
        Tier(unit_price=Decimal("1"), up_to=Decimal(100)),
        Tier(unit_price=Decimal("0.5"), up_to=Decimal(200)),
        Tier(unit_price=Decimal("0.1")),
    ]
    price = _price(tiers=tiers, tier_mode=mode)
    got = tiered_cost(price, Decimal(quantity))
    if mode == "graduated" and quantity == "350":
        expected = str(Decimal(100) + Decimal(50) + Decimal("15.0"))
    assert got == Decimal(expected)


META = [
    {"resource_id": "a", "region": "bj", "vcpus": 2, "flavor": "m1.small"},
    {"resource_id": "b", "region": "sh", "vcpus": 8, "flavor": "m1.large"},
    {"resource_id": "c", "region": "bj", "vcpus": 4, "flavor": "c1.large"},
]


@pytest.mark.parametrize(
    ("field", "op", "value", "expected"),
    [
        ("region", "==", "bj", ["a", "c"]),
        ("region", "!=", "bj", ["b"]),
        ("vcpus", "<=", 4, ["a", "c"]),
        ("vcpus", ">=", 4, ["b", "c"]),
        ("vcpus", "<", 4, ["a"]),
        ("vcpus", ">", 4, ["b"]),
        ("flavor", "=~", r"\.large$", ["b", "c"]),
        ("flavor", "in", ["m1.small", "c1.large"], ["a", "c"]),
    ],
)
def test_every_filter_operator(field: str, op: str, value: Any, expected: list[str]) -> None:
    """== != <= >= < > =~ in over resource metadata."""
    checked = check_filters([Filter(field=field, op=op, value=value)])
    assert [m["resource_id"] for m in META if matches(m, checked)] == expected


# ---- over a real nats-server ----

LIFECYCLE = [
    ("2026-11-20T10:00:00Z", "create", 2),
    ("2026-11-20T10:10:00Z", "resize", 4),
    ("2026-11-20T10:30:00Z", "power_off", None),
    ("2026-11-20T10:40:00Z", "power_on", None),
    ("2026-11-20T11:00:00Z", "delete", None),
]


async def _setup(http: Http, nc: Client) -> None:
    await create_meter(
        http,
        id="vcpu",
        eventType="compute.instance",
        aggregation="duration",
        valueProperty="$.vcpus",
    )
    order = list(range(len(LIFECYCLE)))
    random.Random(3).shuffle(order)
    assert order != sorted(order)
    for i in order:
        at, action, vcpus = LIFECYCLE[i]
        data: dict[str, Any] = {
            "event_type": action,
            "resource_id": "vm-1",
            "resource_type": "instance",
            "region": "bj",
            "resource_name": "web",
        }
        if vcpus is not None:
            data["vcpus"] = vcpus
        await post_event(
            http, id=f"lc{i}", eventType="compute.instance", subject="acme", time=at, data=data
        )
    for body in (
        {
            "name": "vcpu-hour",
            "currency": "EUR",
            "unit_price": "0.05",
            "resource_type": "instance",
            "region": "bj",
            "effective_to": "2026-11-20T10:45:00Z",
        },
        {
            "name": "vcpu-hour-new",
            "currency": "EUR",
            "unit_price": "0.10",
            "resource_type": "instance",
            "region": "bj",
            "effective_from": "2026-11-20T10:45:00Z",
        },
    ):
        resp = await http.post("/v1/prices", json=body)
        assert resp.status == 201, await resp.text()
    await lifecycle_folded(nc)


async def test_lifecycle_out_of_order_gives_records_split_by_state_and_price(
    http: Http, nc: Client, worker: Worker
) -> None:
    """Create (2 vCPU), resize (4), power off, power on, delete - sent shuffled. Records split
    at each state change and at the price change; consumption checked by hand:
    running vCPU-seconds 1200 + 4800 + 1200 at 0.05/h and 3600 at 0.10/h -> 0.10 + 0.10."""
    await _setup(http, nc)
    recs = await (await http.get("/v1/records/vm-1")).json()
    got = [
        (
            r["start_at"][11:19],
            r["end_at"][11:19],
            r["status"],
            r["weight"],
            r["unit_price"],
            r["quantity"],
            r["consumption"],
        )
        for r in recs
    ]
    assert [(a, b, s, w, p) for a, b, s, w, p, _, _ in got] == [
        ("10:00:00", "10:10:00", "running", "2", "0.05"),
        ("10:10:00", "10:30:00", "running", "4", "0.05"),
        ("10:30:00", "10:40:00", "stopped", "4", "0.05"),
        ("10:40:00", "10:45:00", "running", "4", "0.05"),
        ("10:45:00", "11:00:00", "running", "4", "0.10"),
    ]
    quantities = [Decimal(q) for *_, q, _ in got]
    assert quantities == [Decimal(1200) / 3600, Decimal(4800) / 3600, 0, Decimal(1200) / 3600, 1]
    total = sum((Decimal(c) for *_, c in got), Decimal(0))
    assert total.quantize(Decimal("0.000001")) == Decimal("0.200000")
    resources = await (await http.get("/v1/resources")).json()
    assert [(r["resource_id"], r["status"], r["tenant_id"], r["region"]) for r in resources] == [
        ("vm-1", "deleted", "acme", "bj")
    ]
    assert Decimal(resources[0]["consumption"]).quantize(Decimal("0.000001")) == Decimal("0.2")
    assert resources[0]["created_at"].startswith("2026-11-20T10:00:00")
    assert (await http.get("/v1/records/nope")).status == 404


async def test_charging_over_a_period_with_filters(http: Http, nc: Client, worker: Worker) -> None:
    """POST /charging prices the tenant's resources over [start, end), filtered."""
    await _setup(http, nc)
    period = {"start": "2026-11-20T10:20:00Z", "end": "2026-11-20T10:50:00Z"}
    body = await (await http.post("/charging", json={"tenant": "acme", **period})).json()
    # 10:20-10:30 600s x4 at .05, 10:40-10:45 300s x4 at .05, 10:45-10:50 300s x4 at .10
    expected = Decimal(3600) / 3600 * Decimal("0.05") + Decimal(1200) / 3600 * Decimal("0.10")
    assert Decimal(body["totals"]["EUR"]).quantize(Decimal("0.000001")) == expected.quantize(
        Decimal("0.000001")
    )
    assert len(body["items"]) == 2  # one per price in force
    filtered = await (
        await http.post(
            "/charging",
            json={
                "tenant": "acme",
                **period,
                "filters": [{"field": "region", "op": "==", "value": "sh"}],
            },
        )
    ).json()
    assert filtered["items"] == [] and filtered["totals"] == {}
    other = await (await http.post("/charging", json={"tenant": "globex", **period})).json()
    assert other["items"] == []
    resp = await http.post(
        "/charging", json={**period, "filters": [{"field": "x", "op": "~~", "value": 1}]}
    )
    assert resp.status == 400 and (await resp.json())["field"] == "filters[0].op"


async def test_a_running_resource_accrues_up_to_now(http: Http, nc: Client, worker: Worker) -> None:
    """Without a delete, consumption keeps growing with the clock."""
    await create_meter(
        http, id="gb", eventType="volume", aggregation="duration", valueProperty="$.size"
    )
    await post_event(
        http,
        id="v1",
        eventType="volume",
        subject="acme",
        time="2026-11-20T00:00:00Z",
        data={"event_type": "create", "resource_id": "vol-1", "size": 10},
    )
    await http.post(
        "/v1/prices", json={"name": "gb", "currency": "USD", "unit_price": "1", "meter": "gb"}
    )
    await lifecycle_folded(nc)
    first = await (await http.get("/v1/resources")).json()
    second = await (await http.get("/v1/resources")).json()
    assert first[0]["status"] == "running"
    assert Decimal(second[0]["quantity"]) >= Decimal(first[0]["quantity"]) > 10 * 24


async def test_price_book_crud_and_validation(http: Http) -> None:
    """Prices are created, read, replaced and deleted; money stays exact decimal strings."""
    resp = await http.post(
        "/v1/prices",
        json={
            "name": "ram",
            "currency": "EUR",
            "unit_price": "0.0001",
            "resource_type": "ram",
            "region": "bj",
            "tiers": [{"up_to": "100", "unit_price": "0.0001"}, {"unit_price": "0.00005"}],
        },
    )
    assert resp.status == 201
    price = await resp.json()
    assert price["unit_price"] == "0.0001" and price["tiers"][1]["unit_price"] == "0.00005"
    got = await (await http.get(f"/v1/prices/{price['id']}")).json()
    assert got["region"] == "bj"
    resp = await http.put(
        f"/v1/prices/{price['id']}",
        json={"name": "ram", "currency": "EUR", "unit_price": "0.0002", "resource_type": "ram"},
    )
    assert (await resp.json())["unit_price"] == "0.0002"
    assert len(await (await http.get("/v1/prices")).json()) == 1
    assert (await http.delete(f"/v1/prices/{price['id']}")).status == 204
    assert (await http.get(f"/v1/prices/{price['id']}")).status == 404
    for body, field in (
        ({"name": "x", "currency": "euro", "unit_price": "1", "meter": "m"}, "currency"),
        ({"name": "x", "currency": "EUR", "unit_price": "1"}, "meter"),
        ({"name": "x", "currency": "EUR", "unit_price": "-1", "meter": "m"}, "unit_price"),
        (
            {
                "name": "x",
                "currency": "EUR",
                "unit_price": "1",
                "meter": "m",
                "tiers": [{"unit_price": "1"}, {"unit_price": "2"}],
            },
            "tiers[0]",
        ),
    ):
        resp = await http.post("/v1/prices", json=body)
        assert resp.status == 400, body
        assert (await resp.json())["field"] == field


async def test_cost_estimate_gives_min_and_max(http: Http) -> None:
    """Groups with 2-5 instances of 4 vCPUs for 10 hours at 0.05/vCPU-hour: 4.00 to 10.00."""
    await http.post(
        "/v1/prices",
        json={"name": "vcpu", "currency": "EUR", "unit_price": "0.05", "resource_type": "instance"},
    )
    body = await (
        await http.post(
            "/cost",
            json={
                "hours": "10",
                "groups": [
                    {
                        "resource_type": "instance",
                        "min_instances": 2,
                        "max_instances": 5,
                        "usage_per_hour": "4",
                    }
                ],
            },
        )
    ).json()
    assert Decimal(body["totals"]["EUR"]["min_cost"]) == Decimal("4.00")
    assert Decimal(body["totals"]["EUR"]["max_cost"]) == Decimal("10.00")
    resp = await http.post(
        "/cost",
        json={
            "hours": "1",
            "groups": [{"resource_type": "gpu", "min_instances": 1, "max_instances": 1}],
        },
    )
    assert resp.status == 400 and (await resp.json())["field"] == "groups[0]"


def _at(day: int) -> datetime:
    return datetime(2026, 11, day, tzinfo=UTC)


def test_a_later_price_ends_the_earlier_one_whatever_their_order_and_ids() -> None:
    """A price change made as a second price of the same meter, region and type with a later
    effective_from (and no effective_to on the first) takes over at that instant, for every
    order of the price list and every pair of ids: the same request gives the same bill."""
    from itertools import permutations

    from kloudmeter_py.core.rating import pick_price

    for old_id, new_id in (("a", "b"), ("b", "a")):
        old = _price(id=old_id, unit_price=Decimal("0.52"), region="eu", effective_from=_at(1))
        new = _price(id=new_id, unit_price=Decimal("0.32"), region="eu", effective_from=_at(15))
        wildcard = _price(id="c", unit_price=Decimal("9"), region=None, effective_from=_at(20))
        for order in permutations([old, new, wildcard]):

            def at(day: int, order: tuple[Price, ...] = order) -> Decimal | None:
                p = pick_price(order, meter="m", resource_type=None, region="eu", at=_at(day))
                return p.unit_price if p else None

            # before the change, from it on; the more specific price beats a newer wildcard
            assert (at(10), at(15), at(25)) == (Decimal("0.52"), Decimal("0.32"), Decimal("0.32"))


def test_equally_specific_prices_from_the_same_instant_are_ordered_by_id() -> None:
    """Two prices that are equal in specificity and start: the lowest id, in any order."""
    from kloudmeter_py.core.rating import pick_price

    a = _price(id="p1", unit_price=Decimal("1"))
    b = _price(id="p2", unit_price=Decimal("2"))
    for order in ([a, b], [b, a]):
        p = pick_price(order, meter="m", resource_type=None, region="eu", at=_at(5))
        assert p is not None and p.id == "p1"
