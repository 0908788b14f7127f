"""`setup` folds summaries of layout 1 (a key per window) into pages, exactly and only once."""

from datetime import UTC, datetime, timedelta

from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.aggregate import Acc, fold
from kloudmeter_py.core.meters import to_reading
from kloudmeter_py.core.models import Meter, encoder
from kloudmeter_py.core.query import build_query
from kloudmeter_py.core.summaries import as_acc, decode_page, encode_window, page_token
from kloudmeter_py.core.windows import window_token
from kloudmeter_py.store.kv import scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.store.migrate import without_rollups
from kloudmeter_py.store.provision import provision
from kloudmeter_py.store.query import run_query

DAY = 86400


def _acc(*values: int, at: int) -> Acc:
    acc = Acc()
    for i, v in enumerate(values):
        fold(acc, v, None, at * 1000 + i, 100 + i)
    return acc


async def test_setup_moves_each_window_into_its_page_once(nc: Client, settings: Settings) -> None:
    """Windows of one month become one page holding each (the newest meter generation only,
    lastSeq the highest), the window keys are gone, a query reads the same totals, and a
    second run (or one interrupted and run again) counts nothing twice."""
    js = nc.jetstream()
    offsets = await js.key_value("offsets")
    await offsets.purge("layout")  # as an installation of layout 1 has no marker
    day_kv = await js.key_value("summaries_day")
    hour_kv = await js.key_value("summaries_hour")
    meter = Meter(
        id="m",
        eventType="t",
        aggregation="sum",
        valueProperty="$.v",
        startSeq=7,
        createdAt=datetime(2025, 1, 1, tzinfo=UTC),
    )
    await (await js.key_value("meters")).put("m", encoder.encode(meter))
    now = int(datetime.now(UTC).timestamp())
    first = now - now % DAY - 20 * DAY
    if page_token(DAY, first) != page_token(DAY, first + DAY):
        first -= DAY  # both days in one month
    hour = now - now % 3600 - 3600
    old_key = f"m.s.{window_token(first)}"
    await day_kv.put(old_key, encode_window(_acc(3, 4, at=first), 150, 7))
    as_object = to_reading(
        _acc(5, at=first + DAY), meter, "s", (), 120, datetime.now(UTC), window=(first + DAY, DAY)
    )
    await day_kv.put(f"m.s.{window_token(first + DAY)}", encoder.encode(as_object))
    # an earlier generation of the meter: not carried over
    await day_kv.put(f"m.s.{window_token(first - DAY)}", encode_window(_acc(9, at=first), 50, 3))
    await hour_kv.put(f"m.s.{window_token(hour)}", encode_window(_acc(2, at=hour), 160, 7))

    await provision(js, settings)

    days = await scan(js, "summaries_day")
    page_key = f"m.s.{page_token(DAY, first)}"
    assert [k for k, _ in days] == [page_key]
    page = decode_page(days[0][1])
    assert {s: as_acc(a, s).sum for s, a in page.windows.items()} == {first: 7, first + DAY: 5}
    assert (page.last_seq, page.meter_start_seq) == (150, 7)
    hours = await scan(js, "summaries_hour")
    assert [k for k, _ in hours] == [f"m.s.{page_token(3600, hour)}"]
    assert (await offsets.get("layout")).value == b"3"
    # Its rollups hold nothing of what was folded before: meter-wide reads read its pages.
    assert await without_rollups(js, Layout(settings)) == {("m", 7)}

    # Interrupted after writing the page, before removing a window key: run again.
    await day_kv.put(old_key, encode_window(_acc(3, 4, at=first), 150, 7))
    await offsets.purge("layout")
    await provision(js, settings)
    again = await scan(js, "summaries_day")
    assert [k for k, _ in again] == [page_key] and decode_page(again[0][1]) == page

    query = build_query(
        meter,
        start=datetime.fromtimestamp(first, UTC).isoformat(),
        end=(datetime.fromtimestamp(first, UTC) + timedelta(days=2)).isoformat(),
        window_size="DAY",
        tz=None,
        subjects=[],
        group_by=[],
        filter_group_by={},
        interval=settings.interval,
        now=datetime.now(UTC),
        day_retention_days=settings.day_retention_days,
    )
    answer = await run_query(js, settings, meter, query)
    assert [row.value for row in answer["data"]] == [7, 5]
