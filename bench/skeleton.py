"""The floor under pingpost's throughput: its Kafka records per lead, with none of its logic.

Issue 12 asks for ≥ 250 leads/s at ≤ 8 ms of CPU per lead on the 2-core machine, everything
co-located. ``bench/record_cost.py`` prices one record; this bench measures the whole shape:
a worker that reads and writes, per lead, the same records on the same kind of topics as the
auction worker, and does nothing else (no buyers, no HTTP, no Avro, no rules). Whatever it
cannot carry, pingpost cannot either, whatever its own code costs.

Per lead (every topic and table keyed by the lead id, ``--partitions`` partitions, the
product's producer and consumer settings):

- the generator (this process, standing in for ingest) writes ``leads``;
- ``redact`` reads it: the ``lead_ids`` table (changelog), ``lead-pii``, ``ping-requests``;
- ``ping`` reads the request: the ``auctions`` table's open marker, one round record on ``bids``;
- ``pii`` reads ``lead-pii``: the ``pii`` table;
- ``auction`` reads the round: ``auctions`` with its order, ``posts``, ``auctions`` closed;
- ``post`` reads the order: ``postings`` intent, one or two ``deliveries`` (1.5 a lead),
  ``postings`` result, ``results``, the ``pii`` table's deletion.

That is 15.5 records written and 5 read per lead; the real stack writes 16.1–16.6 at 100
leads/s (docs/numbers.md), the rest being cap and progress records and a retried post's
``postings`` writes. Two implementations of the worker:

- ``faust``: Faust agents and tables with the product's settings and patches (what pingpost
  runs on);
- ``plain``: one aiokafka consumer (``getmany`` batches) and producer; the tables are dicts
  whose writes go to their changelog topics; offsets committed every second. What leaving
  Faust's per-event path would buy.

Each step offers ``--rate`` leads/s (open loop) for ``--seconds``; the table reports leads
done per second, receipt → ping p50/p99 (from the generator's timestamp to the ``ping`` step)
and the CPU per lead of the worker, the broker and the generator (``/proc``, at-rest CPU
subtracted). Starts its own broker; nothing else of pingpost runs.

    .venv/bin/python bench/skeleton.py [--impl faust,plain] [--rates 100,200,300,400] [--seconds 20]

``--linger-ms`` and ``--fetch-min-bytes`` change the Faust worker's producer linger and its
consumer's ``fetch_min_bytes`` (the product's: ``worker.producer_linger_ms``,
``worker.fetch_min_bytes``), for sweeps like the one in docs/numbers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.record_cost import cpu_s, read_count, self_cpu_s

TOPICS = ["leads", "ping-requests", "lead-pii", "bids", "posts", "deliveries", "results"]
TABLES = ["lead_ids", "auctions", "pii", "postings"]
LEAD_BYTES = 600
#: What each record carries after the generator's head (its first 40 bytes): the same in both
#: workers, so that they move the same bytes.
BODY = {
    "lead-pii": b" pii" * 40,
    "ping-requests": b" view" * 60,
    "bids": b" bid" * 150,
    "posts": b" order" * 40,
    "deliveries": b" dlv" * 60,
    "results": b" res" * 60,
}


def body(topic: str, value: bytes) -> bytes:
    """The record a stage writes on ``topic`` for the lead whose record is ``value``."""
    return value[:40] + BODY[topic]


def _seq_sent(value: bytes) -> tuple[int, float]:
    """The generator's sequence number and send time, at the head of every record's value."""
    head = value[:40].split(b" ", 2)
    return int(head[0]), float(head[1])


class Stats:
    """What the worker reports: leads done, and each lead's receipt → ping (ms) by sequence."""

    def __init__(self, out: Path) -> None:
        self.out, self.done, self.lat = out, 0, []
        self._f = open(out / "latency.txt", "a")

    def pinged(self, value: bytes) -> None:
        seq, sent = _seq_sent(value)
        self.lat.append(f"{seq} {(time.time() - sent) * 1000:.2f}\n")

    def flush(self) -> None:
        if self.lat:
            self._f.write("".join(self.lat))
            self._f.flush()
            self.lat.clear()
        (self.out / "done.tmp").write_text(str(self.done))
        os.replace(self.out / "done.tmp", self.out / "done")


# ------------------------------------------------------------------------------ workers


def faust_worker(
    bootstrap: str, out: Path, partitions: int, linger_ms: float, fetch_min_bytes: int
) -> None:
    import faust

    from streams.app import faust_settings
    from streams.runtime import faust_patches

    faust_patches.apply(faust_patches.WORKER_FETCH_MAX_WAIT_MS, fetch_min_bytes)
    datadir = Path(tempfile.mkdtemp(prefix="skeleton-faust-"))
    app = faust.App(
        "skeleton",
        datadir=str(datadir),
        broker=f"kafka://{bootstrap}",
        web_enabled=False,
        # The product's own settings (streams/app.py), the linger as configured here.
        **faust_settings(partitions, linger_ms),
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "partitions": partitions,
        "internal": False,
    }
    t = {name: app.topic(name, **raw) for name in TOPICS}
    tables = {
        name: app.Table(name, default=None, partitions=partitions, key_type=str, value_type=None)
        for name in TABLES
    }
    stats = Stats(out)

    @app.agent(t["leads"], name="redact")
    async def redact(stream: Any) -> None:
        async for e in stream.events():
            k = e.key.decode()
            tables["lead_ids"][k] = "x" * 40
            await t["lead-pii"].send(key=e.key, value=body("lead-pii", e.value))
            await t["ping-requests"].send(key=e.key, value=body("ping-requests", e.value))

    @app.agent(t["ping-requests"], name="ping")
    async def ping(stream: Any) -> None:
        async for e in stream.events():
            stats.pinged(e.value)
            tables["auctions"][e.key.decode()] = {"open": True}
            await t["bids"].send(key=e.key, value=body("bids", e.value))

    @app.agent(t["lead-pii"], name="pii")
    async def pii(stream: Any) -> None:
        async for e in stream.events():
            tables["pii"][e.key.decode()] = e.value.decode()

    @app.agent(t["bids"], name="auction")
    async def auction(stream: Any) -> None:
        async for e in stream.events():
            k = e.key.decode()
            tables["auctions"][k] = {"closed": True, "order": "o" * 200}
            await t["posts"].send(key=e.key, value=body("posts", e.value))
            tables["auctions"][k] = {"closed": True}

    @app.agent(t["posts"], name="post")
    async def post(stream: Any) -> None:
        async for e in stream.events():
            k = e.key.decode()
            seq, _ = _seq_sent(e.value)
            tables["postings"][k] = {"intent": "i" * 100}
            for _ in range(1 + seq % 2):
                await t["deliveries"].send(key=e.key, value=body("deliveries", e.value))
            tables["postings"][k] = {"result": "r" * 100}
            await t["results"].send(key=e.key, value=body("results", e.value))
            tables["pii"].pop(k, None)
            stats.done += 1

    @app.timer(0.5)
    async def report() -> None:
        stats.flush()

    worker = faust.Worker(app, loglevel="WARNING", override_logging=False)
    sys.argv = [sys.argv[0], "worker"]
    worker.execute_from_commandline()


async def plain_worker(bootstrap: str, out: Path) -> None:
    """The same records with aiokafka alone: one consumer of the five topics in batches."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from streams.runtime.agents import KeyPartitioner

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, partitioner=KeyPartitioner()
    )
    consumer = AIOKafkaConsumer(
        "leads",
        "ping-requests",
        "lead-pii",
        "bids",
        "posts",
        bootstrap_servers=bootstrap,
        group_id="skeleton-plain",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
    )
    await producer.start()
    await consumer.start()
    tables: dict[str, dict[str, Any]] = {name: {} for name in TABLES}
    stats = Stats(out)

    def table_set(name: str, key: bytes, value: Any, partition: int) -> None:
        tables[name][key.decode()] = value
        encoded = None if value is None else json.dumps(value).encode()
        pending.append(
            producer.send(f"skeleton-{name}-changelog", encoded, key=key, partition=partition)
        )

    pending: list[Any] = []
    last_flush = last_commit = time.monotonic()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, records in batches.items():
                for r in records:
                    k, v, p = r.key, r.value, tp.partition
                    if tp.topic == "leads":
                        table_set("lead_ids", k, "x" * 40, p)
                        pending.append(producer.send("lead-pii", body("lead-pii", v), key=k))
                        pending.append(
                            producer.send("ping-requests", body("ping-requests", v), key=k)
                        )
                    elif tp.topic == "ping-requests":
                        stats.pinged(v)
                        table_set("auctions", k, {"open": True}, p)
                        pending.append(producer.send("bids", body("bids", v), key=k))
                    elif tp.topic == "lead-pii":
                        table_set("pii", k, v.decode(), p)
                    elif tp.topic == "bids":
                        table_set("auctions", k, {"closed": True, "order": "o" * 200}, p)
                        pending.append(producer.send("posts", body("posts", v), key=k))
                        table_set("auctions", k, {"closed": True}, p)
                    elif tp.topic == "posts":
                        seq, _ = _seq_sent(v)
                        table_set("postings", k, {"intent": "i" * 100}, p)
                        for _ in range(1 + seq % 2):
                            pending.append(
                                producer.send("deliveries", body("deliveries", v), key=k)
                            )
                        table_set("postings", k, {"result": "r" * 100}, p)
                        pending.append(producer.send("results", body("results", v), key=k))
                        table_set("pii", k, None, p)
                        stats.done += 1
            if pending:
                # Every send is queued; wait for their buffering (not their acknowledgement)
                # once per batch, as a batch-consuming stage would.
                await asyncio.gather(*pending)
                pending.clear()
            now = time.monotonic()
            if now - last_commit >= 1.0:
                await producer.flush()
                await consumer.commit()
                last_commit = now
            if now - last_flush >= 0.5:
                stats.flush()
                last_flush = now
    finally:
        await consumer.stop()
        await producer.stop()


# ------------------------------------------------------------------------------ the bench


async def create_topics(bootstrap: str, partitions: int, changelogs: bool) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # Faust creates its tables' changelog topics itself; the plain worker's are made here.
        names = TOPICS + ([f"skeleton-{t}-changelog" for t in TABLES] if changelogs else [])
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


async def generate(bootstrap: str, first: int, rate: float, seconds: float) -> int:
    """Offers ``rate`` leads/s for ``seconds``, open loop; returns how many were sent."""
    from aiokafka import AIOKafkaProducer

    from streams.runtime.agents import KeyPartitioner

    pad = b" " + b"l" * LEAD_BYTES
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, partitioner=KeyPartitioner()
    )
    await producer.start()
    try:
        n = int(rate * seconds)
        start = time.monotonic()
        pending = []
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            seq = first + i
            value = f"{seq} {time.time():.6f}".encode() + pad
            pending.append(await producer.send("leads", value, key=f"lead-{seq:09d}".encode()))
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return n
    finally:
        await producer.stop()


def read_done(out: Path) -> int:
    return read_count(out / "done")


def latencies(out: Path, first: int, last: int) -> list[float]:
    lat = []
    with open(out / "latency.txt") as f:
        for line in f:
            seq, ms = line.split()
            if first <= int(seq) < last:
                lat.append(float(ms))
    return sorted(lat)


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_impl(impl: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from connectors.kafka_broker import KafkaBroker
    from tests.integration.kafka_fixture import free_ports

    tmp = Path(tempfile.mkdtemp(prefix=f"skeleton-{impl}-"))
    port, controller = free_ports(2)
    broker = KafkaBroker(port=port, controller_port=controller, data_dir=tmp / "kafka")
    print(f"[{impl}] starting a Kafka broker on {broker.bootstrap} ({tmp})", flush=True)
    broker.start(wait=True, timeout=120)
    proc: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, Any]] = []
    try:
        bootstrap = broker.bootstrap
        asyncio.run(create_topics(bootstrap, args.partitions, impl == "plain"))
        out = tmp / "out"
        out.mkdir()
        cmd = [sys.executable, __file__, "--worker", impl, "--bootstrap", bootstrap]
        cmd += ["--out", str(out), "--partitions", str(args.partitions)]
        cmd += ["--linger-ms", str(args.linger_ms), "--fetch-min-bytes", str(args.fetch_min_bytes)]
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=open(tmp / "worker.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Warm up: a few leads through, until the worker has done them all.
        sent = asyncio.run(generate(bootstrap, 0, 50, 2))
        deadline = time.monotonic() + 120
        while read_done(out) < sent:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the {impl} worker did not start: see {tmp}/worker.log")
            time.sleep(0.1)
        pids = {"worker": proc.pid, "broker": broker.pid() or 0}
        c0 = {n: cpu_s(p) for n, p in pids.items()}
        time.sleep(args.rest)
        rest = {n: (cpu_s(p) - c0[n]) / args.rest for n, p in pids.items()}
        first = sent
        for rate in args.rates:
            done0, t0 = read_done(out), time.monotonic()
            c0 = {n: cpu_s(p) for n, p in pids.items()}
            g0 = self_cpu_s()
            n = asyncio.run(generate(bootstrap, first, rate, args.seconds))
            gen = self_cpu_s() - g0
            deadline = time.monotonic() + args.settle_timeout
            while read_done(out) < done0 + n and time.monotonic() < deadline:
                time.sleep(0.05)
            took = time.monotonic() - t0
            done = read_done(out) - done0
            used = {k: cpu_s(p) - c0[k] - rest[k] * took for k, p in pids.items()}
            lat = latencies(out, first + int(rate * args.warmup), first + n)
            row = {
                "impl": impl,
                "offered": rate,
                "done": done,
                "sustained": done / took,
                "p50": pct(lat, 0.5),
                "p99": pct(lat, 0.99),
                "worker": used["worker"] * 1000 / max(done, 1),
                "broker": used["broker"] * 1000 / max(done, 1),
                "generator": gen * 1000 / max(n, 1),
                "worker_share": used["worker"] / took,
            }
            rows.append(row)
            print(
                f"[{impl}] {rate:.0f}/s: {done:,} of {n:,} done in {took:.1f} s "
                f"({row['sustained']:.1f}/s), receipt → ping p50 {row['p50']:.0f} / p99 "
                f"{row['p99']:.0f} ms, CPU ms/lead worker {row['worker']:.2f} broker "
                f"{row['broker']:.2f} generator {row['generator']:.2f}, worker at "
                f"{row['worker_share'] * 100:.0f} % of a core",
                flush=True,
            )
            first += n
            if done < n:
                print(f"[{impl}] {n - done} leads not done {args.settle_timeout:.0f} s after")
                break
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        broker.stop()
    return rows


def main() -> int:
    from streams.settings.infra import WorkerConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="faust,plain", help="faust, plain, or both (in order)")
    ap.add_argument("--rates", default="100,200,300,400", help="leads/s offered, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="each step's offering time")
    ap.add_argument("--warmup", type=float, default=3.0, help="first seconds left out of %%iles")
    ap.add_argument("--rest", type=float, default=10.0, help="at-rest CPU measured first, s")
    ap.add_argument("--settle-timeout", type=float, default=60.0)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument(
        "--linger-ms",
        type=float,
        default=WorkerConfig.model_fields["producer_linger_ms"].default,
        help="the Faust worker's producer linger (worker.producer_linger_ms)",
    )
    ap.add_argument(
        "--fetch-min-bytes",
        type=int,
        default=WorkerConfig.model_fields["fetch_min_bytes"].default,
        help="the Faust worker's fetch_min_bytes (worker.fetch_min_bytes)",
    )
    ap.add_argument("--worker", choices=["faust", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "faust":
        faust_worker(
            args.bootstrap, args.out, args.partitions, args.linger_ms, args.fetch_min_bytes
        )
        return 0
    if args.worker == "plain":
        asyncio.run(plain_worker(args.bootstrap, args.out))
        return 0
    args.rates = [float(r) for r in args.rates.split(",") if r]
    rows = []
    for impl in args.impl.split(","):
        rows += run_impl(impl.strip(), args)
    print(
        "\n| worker | offered/s | sustained/s | receipt → ping p50 / p99 ms "
        "| CPU ms/lead: worker | broker | generator | worker's share of a core |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['offered']:.0f} | {r['sustained']:.1f} | "
            f"{r['p50']:.0f} / {r['p99']:.0f} | {r['worker']:.2f} | {r['broker']:.2f} | "
            f"{r['generator']:.2f} | {r['worker_share'] * 100:.0f} % |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
