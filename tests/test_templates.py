"""Rating templates: CRUD, and scripts that try to escape, loop or allocate are refused cleanly."""

import time
from decimal import Decimal

import pytest
from nats.aio.client import Client

from kloudmeter_py.worker import Worker
from tests.helpers import Http
from tests.test_rating import _setup

GOOD = """
def rate(data):
    qty = decimal(data["quantity"])
    price = decimal(data["unit_price"])
    if qty > decimal("1"):
        price = price * decimal("0.5")  # half price above one unit
    return qty * price
"""


async def _create(http: Http, source: str) -> str:
    resp = await http.post("/template", json={"name": "t", "source": source})
    assert resp.status == 201, await resp.text()
    template_id: str = (await resp.json())["id"]
    return template_id


async def test_template_crud_and_head(http: Http) -> None:
    """POST, GET (list and one), HEAD and DELETE behave like eBill's /template."""
    tid = await _create(http, GOOD)
    listed = await (await http.get("/template")).json()
    assert [t["id"] for t in listed] == [tid] and "source" not in listed[0]
    assert (await (await http.get(f"/template/{tid}")).json())["source"] == GOOD
    head = await http.head(f"/template/{tid}")
    assert head.status == 200 and await head.read() == b""
    assert (await http.delete(f"/template/{tid}")).status == 204
    assert (await http.head(f"/template/{tid}")).status == 404
    assert (await http.get(f"/template/{tid}")).status == 404
    assert (await http.delete(f"/template/{tid}")).status == 404


async def test_a_template_rates_exactly(http: Http) -> None:
    """A dry run gives an exact decimal."""
    tid = await _create(http, GOOD)
    resp = await http.post(f"/template/{tid}/rate", json={"quantity": "3", "unit_price": "0.05"})
    assert resp.status == 200
    assert Decimal((await resp.json())["cost"]) == Decimal("0.075")


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ('load("os", "system")\ndef rate(d):\n    return 1\n', "load()"),
        ("import os\ndef rate(d):\n    return 1\n", "import"),
        ("def rate(d):\n    return open('/etc/passwd')\n", "open"),
        ("def other(d):\n    return 1\n", "rate(data)"),
        ("def rate(:\n", "Parse error"),
    ],
)
async def test_templates_that_do_not_compile_are_refused_at_upload(
    http: Http, source: str, needle: str
) -> None:
    """Imports, load(), unknown builtins, no rate(): 400 naming the source."""
    resp = await http.post("/template", json={"name": "bad", "source": source})
    assert resp.status == 400
    body = await resp.json()
    assert body["field"] == "source" and needle in body["message"]


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        (
            "def rate(d):\n    for i in range(2000000000):\n"
            "        for j in range(2000000000):\n            pass\n    return 1\n",
            "timeout",
        ),
        (
            'def rate(d):\n    s = "x"\n    for i in range(100):\n'
            "        s = s + s\n    return 1\n",
            "memory",
        ),
        ('def rate(d):\n    return "abc"\n', "failed"),
        ("def rate(d):\n    return None\n", "failed"),
        ("def rate(d):\n    return 1 // 0\n", "failed"),
    ],
)
async def test_templates_that_loop_allocate_or_fail_get_a_clear_error(
    http: Http, source: str, kind: str
) -> None:
    """Endless loops stop at the time limit, runaway memory at the memory limit, bad results
    are refused; the server answers normally afterwards."""
    tid = await _create(http, source)
    started = time.monotonic()
    resp = await http.post(f"/template/{tid}/rate", json={})
    assert resp.status == 422
    body = await resp.json()
    assert body["kind"] == kind, body
    assert time.monotonic() - started < 10
    assert (await http.get("/template")).status == 200


async def test_charging_with_a_template(http: Http, nc: Client, worker: Worker) -> None:
    """POST /charging with a template prices each item with the script."""
    await _setup(http, nc)
    tid = await _create(http, 'def rate(data):\n    return decimal(data["cost"]) * 2\n')
    period = {"start": "2026-11-20T10:00:00Z", "end": "2026-11-20T11:00:00Z"}
    plain = await (await http.post("/charging", json={"tenant": "acme", **period})).json()
    doubled = await (
        await http.post("/charging", json={"tenant": "acme", "template": tid, **period})
    ).json()
    assert Decimal(doubled["totals"]["EUR"]) == 2 * Decimal(plain["totals"]["EUR"])
    resp = await http.post("/charging", json={"tenant": "acme", "template": "nope", **period})
    assert resp.status == 400 and (await resp.json())["field"] == "template"
