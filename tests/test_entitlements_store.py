"""An entitlement's value from the window summaries (store.entitlements.value_at), against a
real nats-server and worker."""

from datetime import UTC, datetime, timedelta

from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.store.entitlements import (
    EntitlementRecord,
    EntitlementStore,
    FeatureRecord,
    GrantRecord,
    Period,
    new_id,
    stored_edge,
    value_at,
)
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, post_event, readings, total_count


async def test_value_burns_two_grants_from_the_summaries(
    http: Http, nc: Client, settings: Settings, worker: Worker
) -> None:
    """Two grants by priority, usage in two stretches: the value at three times, as computed
    by hand, read from the summaries the query reads."""
    await create_meter(
        http, id="tokens", eventType="prompt", aggregation="sum", valueProperty="$.tokens"
    )
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    base = now - timedelta(minutes=90)
    for i, (minutes, tokens, subject) in enumerate(
        [(5, 30, "acme"), (40, 90, "acme"), (41, 1000, "globex"), (-20, 500, "acme")]
    ):
        when = base + timedelta(minutes=minutes, seconds=7)
        await post_event(
            http,
            id=f"e{i}",
            eventType="prompt",
            subject=subject,
            time=when.isoformat(),
            data={"tokens": tokens},
        )
    await eventually(lambda: readings(http, meter="tokens"), lambda rs: total_count(rs) == 4)

    js = nc.jetstream()
    store = EntitlementStore(js, Layout(settings))
    feature = await store.create_feature(
        FeatureRecord(
            id=new_id(), key="gpt", name="GPT", createdAt=now, updatedAt=now, meterSlug="tokens"
        )
    )
    ent = await store.create_entitlement(
        EntitlementRecord(
            id=new_id(),
            type="metered",
            subjectKey="acme",
            featureId=feature.id,
            featureKey=feature.key,
            createdAt=now,
            updatedAt=now,
            usagePeriod=Period("MONTH", base - timedelta(days=1)),
            measureUsageFrom=base,  # the event 20 minutes before it does not count
        )
    )
    for gid, amount, priority, after in (("a", 100, 1, 0), ("b", 50, 2, 30)):
        await store.create_grant(
            GrantRecord(
                id=gid,
                entitlementId=ent.id,
                amount=amount,
                priority=priority,
                effectiveAt=base + timedelta(minutes=after),
                createdAt=now,
                updatedAt=now,
            )
        )

    early = await value_at(js, settings, ent, base + timedelta(minutes=20))
    assert (early.balance, early.usage, early.overage) == (70, 30, 0)
    later = await value_at(js, settings, ent)
    assert (later.balance, later.usage, later.overage, later.hasAccess) == (30, 120, 0, True)
    assert later.totalAvailableGrantAmount == 150
    before = await value_at(js, settings, ent, base)
    assert (before.balance, before.usage) == (100, 0)


def test_edges_round_down_where_fine_summaries_have_expired(settings: Settings) -> None:
    """A stretch edge is exact while minute summaries are kept there, else its hour, else
    its day."""
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    ts = now.timestamp()
    recent = now - timedelta(minutes=37)
    assert stored_edge(recent, settings, ts) == recent
    older = datetime(2026, 3, 9, 20, 37, tzinfo=UTC)  # past minute, within hour retention
    assert stored_edge(older, settings, ts) == datetime(2026, 3, 9, 20, tzinfo=UTC)
    oldest = datetime(2026, 3, 1, 20, 37, tzinfo=UTC)
    assert stored_edge(oldest, settings, ts) == datetime(2026, 3, 1, tzinfo=UTC)
