"""PII never escapes, even when buyers echo it (issue 10, item 6).

Buyers (real local HTTP servers) echo every PII value of the lead they are answering, in
several formats (phone as digits, ``(555) 800-0237``, ``+1 555-800-0237``, email upper-cased,
names, the address, each twice), in every string they return: ping ``buyer_id`` and reasons,
post rejection reasons, HTTP error bodies, non-JSON bodies. Invalid leads with PII also go to
the dead-letter topic. Then every topic outside the documented PII places (the leads topic,
``lead-pii``, the PII table's changelog), every ClickHouse table and every process log is
scanned: zero hits. The scan is shown to work on the leads topic, where the PII must be.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

import schemas
from streams.rules.pinging import ping_id_for
from streams.tools.demo import generate_leads
from streams.topics import changelog_topic
from tests.integration.pipeline import Pipeline, wait_for

pytestmark = pytest.mark.integration

N = 12
FIRST = ["Zenobia", "Quintus", "Ottoline", "Peregrine", "Marigold", "Barnaby"]
LAST = ["Thistlewood", "Honeysett", "Wrenfield", "Ashcombe"]

#: buyer id -> how it answers. Bidders are ranked reject > http422 > garbage > accept, so a
#: shared lead is posted to the first three, which all fail, then to ``accept``.
BUYERS = ["reject", "http422", "garbage", "accept", "nobid", "http500", "notjson"]
PRICES = {"reject": 90.0, "http422": 85.0, "garbage": 80.0, "accept": 70.0}


def make_leads() -> list[dict[str, Any]]:
    leads = []
    for i, lead in enumerate(generate_leads(N, seed=606)):
        first, last = FIRST[i % len(FIRST)], f"{LAST[i % len(LAST)]}{chr(97 + i)}"
        leads.append(
            {
                **lead,
                "lead_id": f"pii-echo-{i}",
                "first_name": first,
                "last_name": last,
                "email": f"{first}.{last}@example.com".lower(),
                "phone": f"+1555800{i:04d}",
                "address": f"{100 + i} Juniperberry Lane, Wintervale",
            }
        )
    return leads


def echo(lead: dict[str, Any]) -> str:
    """Every PII value of ``lead``, in the forms buyers write them, some twice."""
    d = lead["phone"][2:]
    a, b, c = d[:3], d[3:6], d[6:]
    return (
        f"dup {lead['first_name']} {lead['last_name']} / {lead['first_name'].upper()} "
        f"{lead['email'].upper()} {lead['email']} tel {lead['phone'][1:]} ({a}) {b}-{c} "
        f"+1 {a}-{b}-{c} {a}.{b}.{c} {d} at {lead['address']}; {lead['address'].upper()}"
    )


class EchoBuyers:
    """One real HTTP server per buyer port, answering as the buyer's role says."""

    def __init__(self, ports: dict[str, int], leads: list[dict[str, Any]]) -> None:
        self.by_ping = {ping_id_for(x["lead_id"], b): x for x in leads for b in ports}
        self.by_lead = {x["lead_id"]: x for x in leads}
        self.calls: dict[str, int] = {b: 0 for b in ports}
        self.servers = [self._server(b, port) for b, port in ports.items()]
        for s in self.servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def _answer(self, buyer: str, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
        self.calls[buyer] += 1
        if path == "/ping":
            lead = self.by_ping[body["ping_id"]]
            text = echo(lead)
            if buyer == "nobid":
                return (
                    200,
                    "application/json",
                    json.dumps(
                        {"bid": False, "reason": text, "buyer_id": lead["last_name"]}
                    ).encode(),
                )
            if buyer == "http500":
                return 500, "text/plain", f"internal error for {text}".encode()
            if buyer == "notjson":
                return 200, "text/html", f"<html>{text}</html>".encode()
            ref = {
                "reject": lead["first_name"],
                "http422": lead["email"],
                "garbage": lead["phone"][1:],
                "accept": lead["last_name"],
            }[buyer]
            return (
                200,
                "application/json",
                json.dumps(
                    {
                        "bid": True,
                        "price": PRICES[buyer],
                        "exclusive": False,
                        "buyer_id": ref,
                        "reason": text,
                        "note": text,
                    }
                ).encode(),
            )
        text = echo(self.by_lead[body["lead_id"]]) + " " + echo(body)  # what it was sent
        if buyer == "reject":
            return 200, "application/json", json.dumps({"accepted": False, "reason": text}).encode()
        if buyer == "http422":
            return (
                422,
                "application/json",
                json.dumps(
                    {"reason": {"detail": text, "phone": body["phone"]}, "error": text}
                ).encode(),
            )
        if buyer == "garbage":
            return 200, "text/plain", f"ok?? {text}".encode()
        return (
            200,
            "application/json",
            json.dumps({"accepted": True, "message": text, "reason": text}).encode(),
        )

    def _server(self, buyer: str, port: int) -> ThreadingHTTPServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, ctype, out = owner._answer(buyer, self.path, json.loads(raw))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        return server

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()


def needles(leads: list[dict[str, Any]]) -> list[tuple[str, re.Pattern[str]]]:
    """One pattern per PII value, independent of streams/rules/scrub.py: names, emails and address
    words as lower-case substrings; phones by their 10 national digits with any separators."""
    out = []
    for x in leads:
        for v in (x["first_name"], x["last_name"], x["email"]):
            out.append((v, re.compile(re.escape(v.lower()))))
        digits = x["phone"][2:]
        out.append((x["phone"], re.compile(r"[\s().+\-]{0,3}".join(digits))))
    out += [(w, re.compile(w)) for w in ("juniperberry", "wintervale")]
    return out


def hits(text: str, pats: list[tuple[str, re.Pattern[str]]]) -> list[str]:
    low = text.lower()
    return [v for v, p in pats if p.search(low)]


@pytest.fixture(scope="module")
def echo_run(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    leads = make_leads()
    p = Pipeline(
        tmp_path_factory.mktemp("pii_echo"),
        kafka_bootstrap,
        warehouse_url,
        {b: {"timeout_ms": 400} for b in BUYERS},
    )
    ports = {b: p.settings.simulator.buyers[b].port for b in BUYERS}
    buyers = EchoBuyers(ports, leads)
    try:
        p.stack.up(
            embedded_warehouse=False,
            start_kafka=False,
            with_buyers=False,
            workers=1,
            with_metrics=False,
        )
        answers = asyncio.run(p.post_many(leads, wait=True, concurrency=4))
        ids = [a["lead_id"] for a in answers]
        p.settled(ids)
        # Invalid leads carrying PII, straight to Kafka: a valid Avro lead with a bad zip,
        # and a lead as JSON (not Avro: undecodable).
        bad = {k: v for k, v in leads[0].items() if k not in ("flow", "lead_id")}
        asyncio.run(
            p.produce(
                p.names.leads,
                schemas.encode(
                    "Lead",
                    {
                        "flow": "solar",
                        "fields": {**bad, "zip": "ABCDE", "mobile": leads[1]["phone"]},
                        "lead_id": "pii-echo-bad",
                    },
                ),
                key=b"pii-echo-bad",
            )
        )
        asyncio.run(p.produce(p.names.leads, json.dumps(leads[2]).encode(), key=b"pii-json"))
        wait_for(
            lambda: (
                p.rows("SELECT count() FROM {db}.dead_letters FINAL WHERE stage = 'redact'")[0][0]
                >= 2
            ),
            60,
            "two dead letters",
        )
        yield {"p": p, "leads": leads, "ids": ids, "buyers": buyers}
    finally:
        p.stop()
        buyers.close()


async def _topics(bootstrap: str, prefix: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(prefix))
    finally:
        await admin.close()


def test_echoing_buyers_were_asked_and_their_answers_recorded(echo_run: dict[str, Any]) -> None:
    p, ids, buyers = echo_run["p"], echo_run["ids"], echo_run["buyers"]
    for b in BUYERS:
        assert buyers.calls[b] >= N, (b, buyers.calls)
    posts = p.rows(
        "SELECT buyer_id, status, reason FROM {db}.posts FINAL WHERE lead_id IN %(ids)s", ids=ids
    )
    by = {(b, s) for b, s, _ in posts}
    assert {
        ("reject", "rejected"),
        ("http422", "error"),
        ("garbage", "error"),
        ("accept", "accepted"),
    } <= by, by
    # the rejection reasons are kept, scrubbed
    assert any("[redacted]" in r for b, _, r in posts if b == "reject"), posts[:4]
    outcomes = p.rows(
        "SELECT outcome, winners FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s", ids=ids
    )
    assert len(outcomes) == N and all(w == ["accept"] for _, w in outcomes), outcomes


def test_no_pii_outside_its_documented_places(echo_run: dict[str, Any]) -> None:
    p, leads = echo_run["p"], echo_run["leads"]
    pats = needles(leads)
    n = p.names
    pii_topics = {n.leads, n.lead_pii, changelog_topic(p.settings.kafka.app_id, "pii")}
    topics = asyncio.run(_topics(p.settings.kafka.bootstrap, p.name))
    assert {n.bids, n.deliveries, n.deadletter, n.results} <= set(topics), topics
    leaks: list[str] = []
    for topic in topics:
        records = asyncio.run(p.read_topic(topic))
        text = "\n".join(
            (r.key or b"").decode("utf-8", "replace")
            + " "
            + (r.value or b"").decode("utf-8", "replace")
            for r in records
        )
        found = hits(text, pats)
        if topic in pii_topics:
            if topic == n.leads:  # the scan finds PII where it must be
                assert len(found) == len(pats), (topic, found)
            continue
        leaks += [f"topic {topic}: {v}" for v in found]
    for (table,) in p.rows("SELECT name FROM system.tables WHERE database = %(db)s", db=p.db):
        dump = p.ch.raw_query(f"SELECT * FROM {p.db}.`{table}` FORMAT TSV").decode()
        leaks += [f"table {table}: {v}" for v in hits(dump, pats)]
    for log in sorted((p.root / "run" / "logs").glob("*.log")):
        leaks += [f"log {log.name}: {v}" for v in hits(log.read_text(errors="replace"), pats)]
    places = sorted({leak.rsplit(": ", 1)[0] for leak in leaks})
    assert not leaks, f"{len(leaks)} PII values in {places}; e.g. {leaks[:5]}"


def test_dead_letters_keep_what_an_operator_needs(echo_run: dict[str, Any]) -> None:
    p = echo_run["p"]
    records = [
        schemas.decode_as("DeadLetter", r.value)
        for r in asyncio.run(p.read_topic(p.names.deadletter))
    ]
    by_key = {r["key"]: r for r in records if r["stage"] == "redact"}
    bad, js = by_key[b"pii-echo-bad"], by_key[b"pii-json"]
    assert bad["field"] == "zip" and "zip" in bad["reason"] and bad["payload_redacted"]
    view = json.loads(bad["payload"])
    assert view["fields"]["zip"] == "ABCDE" and view["lead_id"] == "pii-echo-bad"
    assert {"email", "phone", "mobile"} <= set(view["withheld"]) <= set(bad["pii_hashes"])
    assert (js["payload"], js["payload_redacted"]) == (b"", True) and js["payload_length"] > 0
    assert bad["topic"] == p.names.leads and bad["offset"] >= 0
