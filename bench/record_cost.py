"""What one Kafka record costs on this machine: through Faust, through plain aiokafka, and in the broker.

pingpost's cost per lead is mostly the cost of its Kafka records (docs/numbers.md,
"Throughput and cost per lead"): a lead writes ~20-27 records and the stack's consumers read
~30. This bench measures the price of one record in isolation, with nothing of pingpost's own
logic, so that the floor a topology of N records per lead can reach is a multiplication:

- a **Faust relay** (one agent: each event of topic ``in`` sent on to ``out``; the product's
  worker settings and Faust patches), i.e. one consumption + one production by a stage;
- a **Faust consumer** of ``out`` that only counts (what the sink and metrics workers do
  before their own work);
- a **plain aiokafka consumer** of ``out`` (``getmany`` batches) that counts: the same work
  without Faust;
- the **producer** (this process, aiokafka, linger 2 ms, acks all) writing ``in``;
- the **broker** (the project's local Kafka 4.1, C1 JIT, its own data dir and free ports):
  first ``--count`` records written with no consumer (the cost of a write), then the whole
  chain (2 writes + 3 reads per record).

CPU is user + system time from ``/proc`` of each process, over the run, minus what the process
uses at rest (measured for ``--rest`` seconds before). Each run starts its own broker and
stops it.

    .venv/bin/python bench/record_cost.py [--count 30000] [--rate 2000] [--size 400]
"""

from __future__ import annotations

import argparse
import asyncio
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

TICK = os.sysconf("SC_CLK_TCK")
PARTITIONS = 6


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------ workers


def faust_worker(kind: str, bootstrap: str, count_file: Path) -> None:
    """A Faust worker with the product's settings: ``relay`` (in -> out) or ``consume``
    (counts ``out``). Writes how many events it has seen to ``count_file`` every 0.2 s."""
    import faust

    from streams.runtime import faust_patches

    faust_patches.apply(faust_patches.WORKER_FETCH_MAX_WAIT_MS if kind == "relay" else 100)
    min_bytes = int(os.environ.get("RECORD_COST_CONSUME_MIN_BYTES", "1"))
    if kind == "consume" and min_bytes > 1:
        from faust.transport.drivers import aiokafka as driver

        cls = driver.AIOKafkaConsumerThread
        create = cls._create_worker_consumer

        def _create_worker_consumer(self: Any, transport: Any) -> Any:
            consumer = create(self, transport)
            consumer._fetch_min_bytes = min_bytes
            return consumer

        cls._create_worker_consumer = _create_worker_consumer
    datadir = Path(tempfile.mkdtemp(prefix=f"record-cost-{kind}-"))
    app = faust.App(
        f"record-cost-{kind}",
        datadir=str(datadir),
        broker=f"kafka://{bootstrap}",
        store="memory://",
        autodiscover=False,
        processing_guarantee="at_least_once",
        topic_partitions=PARTITIONS,
        topic_replication_factor=1,
        producer_acks=-1,
        producer_linger=0.002,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        table_standby_replicas=0,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "partitions": PARTITIONS,
        "internal": False,
    }
    src = app.topic("in" if kind == "relay" else "out", **raw)
    out = app.topic("out", **raw)
    seen = 0

    @app.agent(src, name=kind)
    async def agent(stream: Any) -> None:
        nonlocal seen
        async for event in stream.events():
            if kind == "relay":
                await out.send(key=event.key, value=event.value)
            seen += 1

    @app.timer(0.2)
    async def report() -> None:
        count_file.write_text(str(seen))

    worker = faust.Worker(app, loglevel="WARNING", override_logging=False)
    sys.argv = [sys.argv[0], "worker"]
    worker.execute_from_commandline()


async def plain_consumer(bootstrap: str, count_file: Path) -> None:
    """Counts ``out`` with a plain aiokafka consumer (batches of ``getmany``)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        "out",
        bootstrap_servers=bootstrap,
        group_id="record-cost-plain",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    seen = 0
    last = 0.0
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for records in batches.values():
                seen += len(records)
            if time.monotonic() - last > 0.2:
                count_file.write_text(str(seen))
                last = time.monotonic()
    finally:
        await consumer.stop()


# ------------------------------------------------------------------------------ the bench


async def create_topics(bootstrap: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, count: int, rate: float, size: int) -> float:
    """Send ``count`` records of ``size`` bytes at ``rate``/s; returns this process's CPU s."""
    from aiokafka import AIOKafkaProducer

    values = [os.urandom(size) for _ in range(256)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        cpu0, start = self_cpu_s(), time.monotonic()
        pending = []
        for i in range(count):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            key = f"lead-{i:08d}".encode()
            pending.append(await producer.send(topic, values[i % 256], key=key))
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return self_cpu_s() - cpu0
    finally:
        await producer.stop()


def read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def wait_counts(files: dict[str, Path], target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = {name: read_count(f) for name, f in files.items()}
        if all(c >= target for c in counts.values()):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for the consumers: {counts} of {target}")
        time.sleep(0.1)


def rest_rates(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second of each process at rest."""
    before = {n: cpu_s(p) for n, p in pids.items()}
    time.sleep(seconds)
    return {n: (cpu_s(p) - before[n]) / seconds for n, p in pids.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=30_000, help="records through the chain")
    ap.add_argument("--rate", type=float, default=2000.0, help="records/s offered")
    ap.add_argument("--size", type=int, default=400, help="bytes per record value")
    ap.add_argument("--rest", type=float, default=10.0, help="seconds at rest measured first")
    ap.add_argument("--worker", choices=["relay", "consume", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--count-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker in ("relay", "consume"):
        faust_worker(args.worker, args.bootstrap, args.count_file)
        return 0
    if args.worker == "plain":
        asyncio.run(plain_consumer(args.bootstrap, args.count_file))
        return 0

    from connectors.kafka_broker import KafkaBroker
    from tests.integration.kafka_fixture import free_ports

    tmp = Path(tempfile.mkdtemp(prefix="record-cost-"))
    port, controller = free_ports(2)
    broker = KafkaBroker(port=port, controller_port=controller, data_dir=tmp / "kafka")
    print(f"starting a Kafka broker on {broker.bootstrap} ({tmp})", flush=True)
    broker.start(wait=True, timeout=120)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bootstrap = broker.bootstrap
        asyncio.run(create_topics(bootstrap, ["solo", "in", "out"]))
        broker_pid = broker.pid()
        assert broker_pid is not None

        # Phase 1: writes alone (no consumer anywhere).
        rest = rest_rates({"broker": broker_pid}, args.rest)
        b0, t0 = cpu_s(broker_pid), time.monotonic()
        prod_solo = asyncio.run(produce(bootstrap, "solo", args.count, args.rate, args.size))
        solo_s = time.monotonic() - t0
        broker_solo = cpu_s(broker_pid) - b0 - rest["broker"] * solo_s
        print(f"phase 1: {args.count:,} records written in {solo_s:.1f}s, no consumer", flush=True)

        # Phase 2: the chain.
        files = {k: tmp / f"{k}.count" for k in ("relay", "consume", "plain")}
        for kind, f in files.items():
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        kind,
                        "--bootstrap",
                        bootstrap,
                        "--count-file",
                        str(f),
                    ],
                    cwd=ROOT,
                    stdout=open(tmp / f"{kind}.log", "wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        while not all(f.exists() for f in files.values()):  # every worker running
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"a worker did not start: see the logs in {tmp}")
            time.sleep(0.1)
        # Let the groups settle before measuring: one warm-up record through the chain.
        asyncio.run(produce(bootstrap, "in", 1, 1000, args.size))
        wait_counts(files, 1, 120)
        pids = {"broker": broker_pid, **{k: p.pid for k, p in zip(files, procs, strict=True)}}
        rest = rest_rates(pids, args.rest)
        before, t0 = {n: cpu_s(p) for n, p in pids.items()}, time.monotonic()
        prod_chain = asyncio.run(produce(bootstrap, "in", args.count, args.rate, args.size))
        wait_counts(files, args.count + 1, 600)
        took = time.monotonic() - t0
        used = {n: cpu_s(p) - before[n] - rest[n] * took for n, p in pids.items()}
        print(f"phase 2: {args.count:,} records through the chain in {took:.1f}s", flush=True)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        broker.stop()

    n = args.count
    us = 1e6 / n
    write = broker_solo * us
    reads = (used["broker"] * us - 2 * write) / 3
    rows = [
        ("producer, aiokafka (this process)", (prod_solo + prod_chain) / 2 * us),
        ("Faust relay: one event consumed and one record sent", used["relay"] * us),
        ("Faust consumer that only counts", used["consume"] * us),
        ("plain aiokafka consumer that only counts (getmany)", used["plain"] * us),
        ("broker: a record written (phase 1)", write),
        ("broker: a record read by one consumer group (phase 2 less its 2 writes, / 3)", reads),
    ]
    print(
        f"\nCPU per record, {n:,} records of {args.size} bytes at {args.rate:,.0f}/s offered "
        f"({PARTITIONS} partitions; at-rest CPU subtracted):\n"
    )
    width = max(len(r[0]) for r in rows)
    for label, v in rows:
        print(f"  {label:<{width}}  {v:7.1f} µs")
    print("\n  at rest, CPU %: " + ", ".join(f"{k} {v * 100:.1f}" for k, v in rest.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
