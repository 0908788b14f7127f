"""The dashboard's usage chart, entitlement bars and alerts panel in a real headless Chromium:
what it draws is read back from the page and compared with the APIs' JSON."""

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.store.entitlements import (
    EntitlementRecord,
    EntitlementStore,
    FeatureRecord,
    GrantRecord,
    Period,
    new_id,
)
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, post_event
from tests.test_dashboard import CHROMIUM, chromium  # noqa: F401 (the fixture)

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Everything the chart drew, read in one go (the page redraws every few seconds).
READ_CHART = """() => {
  const chart = document.getElementById("chart");
  const num = (n, a) => Number(n.getAttribute(a));
  return {
    query: chart.dataset.query || null,
    range: chart.dataset.range,
    subject: chart.dataset.subject,
    bars: [...chart.querySelectorAll("rect.bar")].map((r) => ({
      series: r.dataset.series,
      windowStart: r.dataset.windowStart,
      windowEnd: r.dataset.windowEnd,
      value: Number(r.dataset.value),
      // as rendered (attributes and style), in the chart's own units
      x: r.getBBox().x,
      y: r.getBBox().y,
      width: r.getBBox().width,
      height: r.getBBox().height,
      title: r.querySelector("title").textContent,
    })),
    valueTicks: [...chart.querySelectorAll("g.value-tick")].map((g) => ({
      value: Number(g.dataset.value),
      y: num(g.querySelector("line"), "y1"),
      label: g.querySelector("text").textContent,
    })),
    timeTicks: [...chart.querySelectorAll("g.time-tick")].map((g) => ({
      time: g.dataset.time,
      x: num(g.querySelector("line"), "x1"),
      label: g.querySelector("text").textContent,
    })),
    titles: [...chart.querySelectorAll("text.axis-title")].map((t) => t.textContent),
    legend: [...document.querySelectorAll("#legend span")].map((s) => s.dataset.series),
  };
}"""


def _sums(rows: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for series, *_, value in rows:
        out[series] = out.get(series, 0) + value
    return out


def _ms(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


def _scale(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) of the line through the first and last (position, quantity)."""
    (p0, q0), (p1, q1) = pairs[0], pairs[-1]
    slope = (q1 - q0) / (p1 - p0)
    return slope, q0 - slope * p0


async def check_drawn(http: Http, drawn: dict[str, Any], series_of: Any) -> list[Any]:
    """The bars drawn are the rows the chart's query answers (same windows, same values), and
    each stands where the axes say: from 0 up to its value, inside its window."""
    assert drawn["query"], drawn
    resp = await http.get(drawn["query"])
    assert resp.status == 200, await resp.text()
    rows = [r for r in (await resp.json())["data"] if r["value"] is not None]
    want = sorted((series_of(r), r["windowStart"], r["windowEnd"], r["value"]) for r in rows)
    got = sorted((b["series"], b["windowStart"], b["windowEnd"], b["value"]) for b in drawn["bars"])
    assert got == want
    # Readable axes: labelled value ticks (0 among them) and time ticks, axis titles, a legend.
    values = drawn["valueTicks"]
    assert len(values) >= 3 and 0 in [t["value"] for t in values]
    assert all(re.fullmatch(r"-?[\d,]+(\.\d+)?", t["label"]) for t in values), values
    times = drawn["timeTicks"]
    assert len(times) >= 4
    label = r"\d\d:\d\d|[A-Z][a-z]{2} \d{1,2}"
    assert all(re.fullmatch(label, t["label"]) for t in times), times
    assert any(t.startswith("time (UTC)") for t in drawn["titles"])
    assert sorted(drawn["legend"]) == sorted({s for s, *_ in want})
    # Positions: the value axis maps the bar's ends to 0 and its value, the time axis puts
    # it inside its window.
    v_slope, v_zero = _scale([(t["y"], t["value"]) for t in values])
    t_slope, t_zero = _scale([(t["x"], _ms(t["time"])) for t in times])
    span = values[-1]["value"] - values[0]["value"]
    for b in drawn["bars"]:
        ends = sorted(v_slope * y + v_zero for y in (b["y"], b["y"] + b["height"]))
        assert abs(ends[0] - min(0, b["value"])) < span * 1e-6, b
        assert abs(ends[1] - max(0, b["value"])) < span * 1e-6, b
        left, right = (t_slope * x + t_zero for x in (b["x"], b["x"] + b["width"]))
        assert _ms(b["windowStart"]) <= left < right <= _ms(b["windowEnd"]), b
        assert b["series"] in b["title"] and b["windowStart"] in b["title"]
    return want


@pytest.fixture
async def page(http: Http, chromium: str) -> AsyncIterator[Any]:  # noqa: F811
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            pg = await browser.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            yield pg
            assert errors == []
        finally:
            await browser.close()


async def _wait_drawn(page: Any, range_: str, subject: str) -> dict[str, Any]:
    await page.wait_for_function(
        "([r, s]) => { const c = document.getElementById('chart');"
        " return c.dataset.range === r && c.dataset.subject === s"
        " && c.querySelector('rect.bar') !== null; }",
        arg=[range_, subject],
        timeout=15_000,
    )
    drawn: dict[str, Any] = await page.evaluate(READ_CHART)
    return drawn


async def test_chart_draws_the_query_per_range_and_subject(
    http: Http, worker: Worker, page: Any, tmp_path: Path
) -> None:
    """Each range (hour / day / month) and subject picked redraws the chart with exactly
    the windows and values the query API answers, on labelled axes with a legend."""
    await create_meter(
        http, id="tokens", eventType="llm", aggregation="sum", valueProperty="$.tokens"
    )
    now = datetime.now(UTC)
    sent = [
        ("alice", 5, timedelta(minutes=3)),
        ("alice", 7.5, timedelta(minutes=25)),
        ("alice", 11, timedelta(hours=5)),
        ("alice", 13, timedelta(days=10)),
        ("bob", 3, timedelta(minutes=4)),
        ("bob", 40, timedelta(hours=20)),
        ("bob", 17, timedelta(days=3)),
    ]
    for n, (subject, tokens, ago) in enumerate(sent):
        when = (now - ago).isoformat()
        await post_event(
            http, id=f"e{n}", eventType="llm", subject=subject, time=when, data={"tokens": tokens}
        )
    resp = await http.post(
        "/api/v1/customers",
        json={"key": "acme", "name": "ACME", "usageAttribution": {"subjectKeys": ["alice", "bob"]}},
    )
    assert resp.status == 201, await resp.text()

    async def total() -> float:
        r = await http.get("/api/v1/meters/tokens/query")
        return float(sum(row["value"] for row in (await r.json())["data"]))

    await eventually(total, lambda v: v == sum(t for _, t, _ in sent))

    await page.goto(str(http.make_url("/")))
    by_subject = lambda r: r["subject"]  # noqa: E731
    # The default: the last day by hour, every subject.
    drawn = await _wait_drawn(page, "day", "")
    want = await check_drawn(http, drawn, by_subject)
    assert _sums(want) == {"alice": 5 + 7.5 + 11, "bob": 3 + 40}
    # The last hour by minute.
    await page.select_option("#chart-range", "hour")
    want = await check_drawn(http, await _wait_drawn(page, "hour", ""), by_subject)
    assert sorted(v for *_, v in want) == [3, 5, 7.5]
    # One subject: its own line only.
    await page.wait_for_selector('#chart-subject option[value="s:bob"]', state="attached")
    await page.select_option("#chart-subject", "s:bob")
    drawn = await _wait_drawn(page, "hour", "s:bob")
    want = await check_drawn(http, drawn, lambda r: "bob")
    assert [(s, v) for s, *_, v in want] == [("bob", 3)] and drawn["legend"] == ["bob"]
    # The last 30 days by day.
    await page.select_option("#chart-range", "month")
    want = await check_drawn(http, await _wait_drawn(page, "month", "s:bob"), lambda r: "bob")
    assert sum(v for *_, v in want) == 3 + 40 + 17
    # A customer: its subjects' usage merged into one line.
    option = await page.get_attribute('#chart-subject option[value^="c:"]', "value")
    assert option is not None
    await page.select_option("#chart-subject", option)
    want = await check_drawn(
        http, await _wait_drawn(page, "month", option), lambda r: "customer acme"
    )
    assert sum(v for *_, v in want) == sum(t for _, t, _ in sent)
    await page.select_option("#chart-subject", "")
    await page.select_option("#chart-range", "day")
    await _wait_drawn(page, "day", "")
    await page.screenshot(path=str(tmp_path / "usage.png"), full_page=True)


async def test_panels_show_none_cleanly(http: Http, worker: Worker, page: Any) -> None:
    """A subject with no entitlements and no alerts shows so, without an error."""
    await create_meter(http, id="calls", eventType="req", aggregation="count")
    await post_event(http, id="e1", eventType="req", subject="carol")
    await page.goto(str(http.make_url("/")))
    await page.wait_for_selector("#entitlements .note", state="attached")
    assert "Pick a subject" in (await page.text_content("#entitlements") or "")
    await page.wait_for_selector('#chart-subject option[value="s:carol"]', state="attached")
    await page.select_option("#chart-subject", "s:carol")
    await page.wait_for_selector('#entitlements[data-subject="carol"]', state="attached")
    await page.wait_for_selector('#alerts[data-subject="carol"]', state="attached")
    assert await page.text_content("#entitlements") == "No entitlements for carol."
    assert await page.text_content("#alerts") == "No recent alerts."


READ_ENTITLEMENTS = """() => [...document.querySelectorAll("#entitlements .entitlement")]
.map((e) => {
  const bar = e.querySelector(".bar")?.getBoundingClientRect();
  const fill = e.querySelector(".bar .fill")?.getBoundingClientRect();
  const mark = e.querySelector(".bar .limit")?.getBoundingClientRect();
  return {
    feature: e.dataset.feature,
    type: e.dataset.type,
    usage: e.dataset.usage === undefined ? null : Number(e.dataset.usage),
    limit: e.dataset.limit === undefined ? null : Number(e.dataset.limit),
    balance: e.dataset.balance === undefined ? null : Number(e.dataset.balance),
    overage: e.dataset.overage === undefined ? null : Number(e.dataset.overage),
    // as rendered: the fill's width and the limit mark's middle, as fractions of the bar
    filled: bar ? fill.width / bar.width : null,
    mark: bar ? (mark.left + mark.width / 2 - bar.left) / bar.width : null,
    over: bar ? e.querySelector(".bar").classList.contains("over") : null,
    text: e.textContent,
  };
})"""


async def _bar_shown(page: Any, option: str, want: dict[str, Any]) -> dict[str, Any]:
    """Pick ``option`` (again: the panels redraw at once) and wait for the usage the value
    API answered; the entitlements shown, by feature key."""
    await page.wait_for_selector(f'#chart-subject option[value="{option}"]', state="attached")
    await page.select_option("#chart-subject", "")
    await page.select_option("#chart-subject", option)
    await page.wait_for_function(
        "u => document.querySelector('#entitlements .entitlement[data-usage]')"
        "?.dataset.usage === String(u)",
        arg=want["usage"],
        timeout=15_000,
    )
    shown = {e["feature"]: e for e in await page.evaluate(READ_ENTITLEMENTS)}
    bar = shown["gpt_tokens"]
    assert (bar["usage"], bar["limit"], bar["balance"], bar["overage"]) == (
        want["usage"],
        want["totalAvailableGrantAmount"],
        want["balance"],
        want["overage"],
    )
    # The bar spans the limit, or the usage past it; the mark stands at the limit.
    used, limit = want["usage"], want["totalAvailableGrantAmount"]
    scale = max(limit, used)
    assert abs(bar["filled"] - used / scale) < 0.01, bar
    assert abs(bar["mark"] - limit / scale) < 0.01, bar
    assert bar["over"] == (used > limit)
    assert f"{used:g} used of {limit:g}" in bar["text"]
    return shown


async def test_entitlement_bar_shows_the_value_api(http: Http, worker: Worker, page: Any) -> None:
    """A subject's metered entitlement is drawn as its usage against its limit (the grants
    available), equal to the value API's, as usage grows past the limit; a boolean one is
    listed without a bar; a customer's entitlement counts all its subjects."""
    await create_meter(
        http, id="tokens", eventType="llm", aggregation="sum", valueProperty="$.tokens"
    )
    for body in (
        {"key": "gpt_tokens", "name": "GPT tokens", "meterSlug": "tokens"},
        {"key": "sso", "name": "SSO"},
    ):
        resp = await http.post("/api/v1/features", json=body)
        assert resp.status == 201, await resp.text()
    resp = await http.post(
        "/api/v1/customers",
        json={"key": "acme", "name": "ACME", "usageAttribution": {"subjectKeys": ["alice", "bob"]}},
    )
    assert resp.status == 201, await resp.text()
    start = (datetime.now(UTC) - timedelta(days=1)).replace(second=0, microsecond=0)
    metered = {
        "type": "metered",
        "featureKey": "gpt_tokens",
        "usagePeriod": {"interval": "MONTH", "anchor": start.isoformat()},
        "measureUsageFrom": start.isoformat(),
    }
    alice = "/api/v1/subjects/alice/entitlements"
    acme = "/api/v2/customers/acme/entitlements"
    for path, body in ((alice, metered), (alice, {"type": "boolean", "featureKey": "sso"})):
        resp = await http.post(path, json=body)
        assert resp.status == 201, await resp.text()
    resp = await http.post(acme, json=metered)
    assert resp.status == 201, await resp.text()
    for path, amount, priority in ((alice, 100, 1), (alice, 50, 2), (acme, 500, 1)):
        grant = {"amount": amount, "priority": priority, "effectiveAt": start.isoformat()}
        resp = await http.post(f"{path}/gpt_tokens/grants", json=grant)
        assert resp.status == 201, await resp.text()

    def value(base: str) -> Any:
        async def get() -> dict[str, Any]:
            resp = await http.get(f"{base}/gpt_tokens/value")
            assert resp.status == 200, await resp.text()
            out: dict[str, Any] = await resp.json()
            return out

        return get

    await page.goto(str(http.make_url("/")))
    sent = 0.0
    for n, tokens in enumerate((30, 90, 60)):
        await post_event(
            http, id=f"e{n}", eventType="llm", subject="alice", data={"tokens": tokens}
        )
        sent += tokens
        want = await eventually(value(alice), lambda v, s=sent: v["usage"] == s)  # type: ignore[misc]
        assert want["totalAvailableGrantAmount"] == 150
        shown = await _bar_shown(page, "s:alice", want)
        assert shown["sso"]["type"] == "boolean" and shown["sso"]["filled"] is None
    # The customer's: alice's usage and bob's against the customer's grant.
    await post_event(http, id="e3", eventType="llm", subject="bob", data={"tokens": 25})
    want = await eventually(value(acme), lambda v: v["usage"] == sent + 25)
    assert want["totalAvailableGrantAmount"] == 500
    option = await page.get_attribute('#chart-subject option[value^="c:"]', "value")
    assert option is not None
    shown = await _bar_shown(page, option, want)
    assert list(shown) == ["gpt_tokens"]


@pytest.fixture
async def receiver() -> AsyncIterator[str]:
    """A webhook receiver that takes every delivery: its URL."""
    app = web.Application()
    app.router.add_post("/hook", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/hook"
    await runner.cleanup()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def test_alerts_panel_lists_the_subjects_notification_events(
    http: Http, worker: Worker, page: Any, nc: Client, settings: Settings, receiver: str
) -> None:
    """The picked subject's threshold alerts are listed newest first, as the notification
    events API answers them (same ids, same order), each naming its threshold."""
    await create_meter(
        http, id="tokens", eventType="llm", aggregation="sum", valueProperty="$.tokens"
    )
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    store = EntitlementStore(nc.jetstream(), Layout(settings))
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
            usagePeriod=Period("MONTH", start),
            measureUsageFrom=start,
        )
    )
    await store.create_grant(
        GrantRecord(
            id=new_id(),
            entitlementId=ent.id,
            amount=40,
            priority=1,
            effectiveAt=start,
            createdAt=now,
            updatedAt=now,
        )
    )
    resp = await http.post(
        "/api/v1/notification/channels", json={"type": "WEBHOOK", "name": "ops", "url": receiver}
    )
    assert resp.status == 201, await resp.text()
    channel = (await resp.json())["id"]
    rule = {
        "type": "entitlements.balance.threshold",
        "name": "tokens used",
        "channels": [channel],
        "thresholds": [{"type": "NUMBER", "value": 10}, {"type": "PERCENT", "value": 75}],
        "features": ["gpt"],
    }
    resp = await http.post("/api/v1/notification/rules", json=rule)
    assert resp.status == 201, await resp.text()

    async def listed() -> list[dict[str, Any]]:
        query = {"subject": "acme", "order": "DESC", "orderBy": "createdAt", "pageSize": "10"}
        r = await http.get("/api/v1/notification/events", params=query)
        assert r.status == 200, await r.text()
        items: list[dict[str, Any]] = (await r.json())["items"]
        return items

    await page.goto(str(http.make_url("/")))
    for n, tokens in enumerate((12, 20)):
        await post_event(http, id=f"e{n}", eventType="llm", subject="acme", data={"tokens": tokens})
        events = await eventually(listed, lambda items, n=n: len(items) == n + 1)  # type: ignore[misc]
        await page.wait_for_selector('#chart-subject option[value="s:acme"]', state="attached")
        await page.select_option("#chart-subject", "")
        await page.select_option("#chart-subject", "s:acme")
        await page.wait_for_function(
            "n => document.querySelectorAll('#alerts li').length === n", arg=n + 1
        )
        shown = await page.eval_on_selector_all(
            "#alerts li", "lis => lis.map((li) => [li.dataset.eventId, li.textContent])"
        )
        assert [eid for eid, _ in shown] == [e["id"] for e in events]
        assert "gpt" in shown[-1][1] and "crossed 10" in shown[-1][1]
    assert "crossed 75%" in shown[0][1]
