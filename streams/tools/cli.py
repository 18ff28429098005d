"""``pingpost``: the command line.

    pingpost demo                 whole local stack + simulated buyers + 1,000 leads + report
    pingpost up | down | status   the local stack (Kafka, warehouse, buyers, workers, ingest)
    pingpost worker [--role auction|sink|metrics]
    pingpost supervise -- CMD     run a pingpost command, restart it when it fails
    pingpost ingest               HTTP ingest (POST /v1/leads)
    pingpost warehouse            the embedded ClickHouse-compatible warehouse (chDB)
    pingpost buyers simulate      the demo market of simulated buyers
    pingpost kafka start|stop     the local Kafka broker
    pingpost topics create        create every topic with its partition count
    pingpost migrate              apply ClickHouse migrations
    pingpost report [--html PATH] the terminal report from ClickHouse (or an HTML file)
    pingpost sql "SELECT ..."     run SQL against the configured ClickHouse
    pingpost check-config         validate the configuration file

Every command takes ``--config FILE`` (default ``$PINGPOST_CONFIG``, then
``config/demo.yaml``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

from streams.runtime.faust_patches import PatchVersionError
from streams.settings import ConfigError, Settings, load_settings

__all__ = ["main"]

DEFAULT_CONFIG = "config/demo.yaml"
RUN_DIR = Path(os.environ.get("PINGPOST_RUN_DIR", ".run"))


class CliError(Exception):
    """A failure the user fixes, not a bug: printed as one line, exit status 1."""


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config or os.environ.get("PINGPOST_CONFIG") or DEFAULT_CONFIG)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("PINGPOST_CONFIG") or DEFAULT_CONFIG).resolve()


def _kafka_port(settings: Settings) -> int:
    return int(settings.kafka.bootstrap.rsplit(":", 1)[1])


def _stack(args: argparse.Namespace, settings: Settings) -> Any:
    from streams.tools.stack import Stack

    return Stack(settings, _config_path(args), RUN_DIR.resolve(), kafka_port=_kafka_port(settings))


def _wait_for_kafka(bootstrap: str, log_every_s: float = 10.0) -> None:
    """Block until a broker of ``bootstrap`` answers a metadata request. A worker started (or
    restarted by its supervisor) while the broker is down waits for it instead of failing
    its start-up ("Unable to bootstrap"), which its supervisor would not retry."""
    from connectors.kafka_broker import _metadata_ready

    hosts = [h.strip().rsplit(":", 1) for h in bootstrap.split(",") if h.strip()]
    started = last_said = time.monotonic()
    while True:
        for host, port in hosts:
            if _metadata_ready(host, int(port), timeout=2.0):
                if time.monotonic() - started > 1.0:
                    print(
                        f"Kafka at {bootstrap} answers after "
                        f"{time.monotonic() - started:.0f} s; starting",
                        flush=True,
                    )
                return
        if time.monotonic() - last_said >= log_every_s:
            print(
                f"waiting for Kafka at {bootstrap} (not reachable for "
                f"{time.monotonic() - started:.0f} s)",
                flush=True,
            )
            last_said = time.monotonic()
        time.sleep(0.5)


def cmd_worker(args: argparse.Namespace) -> int:
    import faust

    from streams.app import create_app

    settings = _settings(args)
    if args.role == "sink":
        # Analytics must never take CPU from auctions on a shared host: the sink catches up
        # later (its events wait in Kafka), an auction cannot.
        os.nice(10)
    elif args.role == "metrics":
        # Light (a few counters per event) and not latency-critical to the millisecond.
        os.nice(5)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        pass
    _wait_for_kafka(settings.kafka.bootstrap)
    app = create_app(
        settings,
        args.role,
        web_port=args.web_port,
        data_root=RUN_DIR / "faust",
        instance_id=args.instance_id or None,
    )
    worker = faust.Worker(app, loglevel=args.loglevel, override_logging=True)
    # A stuck Kafka client ends this process with status 75 for its supervisor to restart it.
    from streams.runtime.liveness import start_monitor

    start_monitor(settings.kafka.bootstrap)
    worker.execute_from_commandline()
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    from streams.tools.supervise import main_args, supervise

    cmd = main_args(args.config, args.command_line)
    name = " ".join(a for a in cmd[3:] if a != "--config" and a != args.config)
    return supervise(cmd, name or "command")


def cmd_ingest(args: argparse.Namespace) -> int:
    from streams.stages.ingest import run

    run(_settings(args), port=args.port)
    return 0


def cmd_warehouse(args: argparse.Namespace) -> int:
    from connectors.warehouse import WarehouseError, run

    s = _settings(args)
    try:
        run(
            args.data_dir or s.warehouse.data_dir,
            host=s.warehouse.host,
            port=args.port or s.warehouse.port,
            pool_size=s.warehouse.pool_size,
            max_pool_size=max(s.warehouse.pool_size, s.warehouse.max_pool_size),
            # The embedded warehouse asks for the credentials the clients are configured with.
            user=s.clickhouse.username,
            password=s.clickhouse.password.get_secret_value(),
        )
    except WarehouseError as exc:
        print(f"pingpost warehouse: {exc}", file=sys.stderr)
        return 3
    return 0


def cmd_buyers(args: argparse.Namespace) -> int:
    from streams.tools.simulator import run

    run(_settings(args))
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    s = _settings(args)
    broker = _stack(args, s).broker()
    if args.action == "start":
        broker.start(wait=True, timeout=120)
        print(f"Kafka ready on {broker.bootstrap} (data: {broker.data_dir})")
    else:
        broker.stop()
        print("Kafka stopped")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from connectors.kafka_broker import create_topics
    from streams.topics import topic_specs

    s = _settings(args)
    created = asyncio.run(
        create_topics(s.kafka.bootstrap, [(t.name, t.partitions, t.config) for t in topic_specs(s)])
    )
    for name, new in created.items():
        print(f"{name}: {'created' if new else 'exists'}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from connectors.clickhouse import connect, migrate

    s = _settings(args)

    async def go() -> list[int]:
        wh = await connect(s.clickhouse, attempts=10, delay_s=0.5)
        try:
            return await migrate(wh)
        finally:
            await wh.close()

    applied = asyncio.run(go())
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def _up(st: Any, **kwargs: Any) -> None:
    """``st.up``; when it fails, stop what it started and raise a one-line :class:`CliError`
    (the component's log path is in it)."""
    from streams.tools.stack import StackError

    try:
        st.up(**kwargs)
    except StackError as exc:
        stopped = st.abort()
        first = str(exc).splitlines()[0].rstrip(":")
        raise CliError(
            first + (f" (stopped what this run started: {', '.join(stopped)})" if stopped else "")
        ) from None


def cmd_up(args: argparse.Namespace) -> int:
    s = _settings(args)
    st = _stack(args, s)
    _up(st, with_buyers=not args.no_buyers, workers=args.workers)
    _print_status(st)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    s = _settings(args)
    stopped = _stack(args, s).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _print_status(st: Any) -> None:
    for name, ok in st.status().items():
        print(f"  {name:10s} {'running' if ok else 'stopped'}")


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(_stack(args, _settings(args)))
    return 0


def _no_warehouse(args: argparse.Namespace, s: Settings, exc: Exception) -> CliError:
    text = str(exc)
    why = "connection refused" if "Connection refused" in text else text.splitlines()[0][:200]
    return CliError(
        f"no ClickHouse answers at {s.clickhouse.url} (clickhouse.url in "
        f"{_config_path(args)}): "
        f"{why}. Start the local stack with `pingpost up` (or only the warehouse "
        "with `pingpost warehouse`), or point clickhouse.url at a running ClickHouse"
    )


def _sync_client(args: argparse.Namespace, s: Settings, **kwargs: Any) -> Any:
    """A synchronous clickhouse-connect client for the CLI (never used inside an agent)."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import OperationalError

    from connectors.clickhouse import _client_kwargs

    # Connecting: the libraries' own warnings about a refused connection would only repeat
    # the one line said below.
    quiet = [logging.getLogger(n) for n in ("urllib3", "clickhouse_connect")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        return clickhouse_connect.get_client(**_client_kwargs(s.clickhouse), **kwargs)
    except OperationalError as exc:
        raise _no_warehouse(args, s, exc) from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def cmd_report(args: argparse.Namespace) -> int:
    from streams.tools.report import build_report, print_report

    try:
        since, until = _window(args)
    except ValueError as exc:
        print(f"pingpost report: {exc}", file=sys.stderr)
        return 2
    from clickhouse_connect.driver.exceptions import OperationalError
    from rich.console import Console

    s = _settings(args)
    client = _sync_client(args, s)
    try:
        # Every query is an aggregate of constant size (nothing grows with the number of
        # leads but the warehouse's work): progress is the query being run, on stderr.
        with Console(stderr=True).status("querying the warehouse") as status:
            counted = _ProgressClient(client, status)
            summary = build_report(counted, s.clickhouse.database, since=since, until=until)
            if args.html:
                from streams.tools.html_report import write_html_report

                path = write_html_report(
                    counted,
                    s.clickhouse.database,
                    args.html,
                    since=since,
                    until=until,
                    summary=summary,
                    experiments=_experiments(counted, s, since, until),
                )
        if args.html:
            print(f"HTML report: {path}")
        else:
            print_report(summary)
            from streams.tools.experiment import print_experiment

            for result in _experiments(counted, s, since, until):
                print_experiment(result)
    except OperationalError as exc:  # the warehouse went away meanwhile
        raise _no_warehouse(args, s, exc) from None
    finally:
        client.close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from streams.tools.replay import check_overrides, load_overrides, print_result, run_replay

    s = _settings(args)
    if args.advise_timeouts:
        return _advise_timeouts(args, s)
    if not args.strategy:
        print("pingpost replay: give --strategy FILE (or --advise-timeouts)", file=sys.stderr)
        return 2
    try:
        since, until = _window(args)
        overrides = load_overrides(args.strategy)
        ids = _lead_ids(args)
    except (OSError, ValueError) as exc:
        print(f"pingpost replay: {exc}", file=sys.stderr)
        return 2
    try:
        check_overrides(s, overrides)
    except ValueError as exc:
        print(f"pingpost replay: {args.strategy}: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.confidence < 1:
        print("pingpost replay: --confidence must be between 0 and 1 (e.g. 0.95)", file=sys.stderr)
        return 2
    from clickhouse_connect.driver.exceptions import OperationalError

    client = _sync_client(args, s)
    try:
        with (
            _lab_scope(client, s.clickhouse.database, args, since, until, ids) as scope,
            _chunk_progress("replaying") as progress,
        ):
            result = run_replay(
                client,
                s.clickhouse.database,
                s,
                overrides,
                scope,
                seed=args.seed,
                resamples=args.resamples,
                confidence=args.confidence,
                progress=progress,
            )
    except ValueError as exc:  # a strategy key the flow's model refuses
        print(f"pingpost replay: {args.strategy}: {exc}", file=sys.stderr)
        return 2
    except OperationalError as exc:
        raise _no_warehouse(args, s, exc) from None
    finally:
        client.close()
    if result.baseline.auctions == 0:
        print("pingpost replay: no auctions in that window", file=sys.stderr)
        return 1
    if args.html:
        from streams.tools.lab_html import write_replay_html

        scope = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("since", args.since),
                ("until", args.until),
                ("leads", args.lead_prefix and args.lead_prefix + "*"),
                ("variant", args.variant),
            )
            if v
        )
        path = write_replay_html(
            result, args.html, f"Replay: {args.strategy}", scope or "every recorded auction"
        )
        print(f"HTML replay: {path}")
    else:
        print_result(result)
    return 0


@contextmanager
def _chunk_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for a batch job read in chunks; yields its callback
    ``(done, total)``. Gone when the job ends (the results follow on stdout)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        label,
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        job = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(job, completed=done, total=total)


def _lead_ids(args: argparse.Namespace) -> list[str] | None:
    """``--leads FILE``: one lead id per line (blank lines and ``#`` comments skipped)."""
    if not getattr(args, "leads", None):
        return None
    text = Path(args.leads).read_text(encoding="utf-8")
    ids = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    if not ids:
        raise ValueError(f"{args.leads}: no lead id in it (one per line)")
    return ids


@contextmanager
def _lab_scope(
    client: Any, db: str, args: argparse.Namespace, since: Any, until: Any, ids: list[str] | None
) -> Iterator[Any]:
    """The auctions a lab command reads (streams.tools.replay.Scope), with ``--leads`` as a
    table for as long as the command runs."""
    from streams.tools.replay import Scope, lead_set

    base = Scope(since, until, args.lead_prefix, getattr(args, "variant", None))
    if ids is None:
        yield base
        return
    with lead_set(client, db, ids) as table:
        yield replace(base, lead_table=table)


def _window(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--since``/``--until`` parsed (ValueError with the reason)."""
    from streams.tools.report import parse_time

    return (
        parse_time(args.since) if args.since else None,
        parse_time(args.until) if args.until else None,
    )


def _advise_timeouts(args: argparse.Namespace, s: Settings) -> int:
    """``replay --advise-timeouts``: each buyer's timeout and the flow's deadline, option by
    option; then the proposals replayed together."""
    try:
        since, until = _window(args)
        ids = _lead_ids(args)
    except (OSError, ValueError) as exc:
        print(f"pingpost replay: {exc}", file=sys.stderr)
        return 2
    flow = args.flow or next(iter(s.flows))
    if flow not in s.flows:
        print(f"pingpost replay: no flow '{flow}' ({', '.join(s.flows)})", file=sys.stderr)
        return 2
    from clickhouse_connect.driver.exceptions import OperationalError

    client = _sync_client(args, s)
    try:
        with _lab_scope(client, s.clickhouse.database, args, since, until, ids) as scope:
            return _advise_in(args, s, client, flow, scope)
    except OperationalError as exc:
        raise _no_warehouse(args, s, exc) from None
    finally:
        client.close()


def _advise_in(args: argparse.Namespace, s: Settings, client: Any, flow: str, scope: Any) -> int:
    """The advice, then the proposals replayed together (stdout)."""
    from streams.tools.advice import print_advice, proposed_overrides, run_advice
    from streams.tools.replay import print_result, run_replay

    with _chunk_progress("advising") as progress:
        advice = run_advice(
            client,
            s.clickhouse.database,
            s,
            flow,
            scope,
            seed=args.seed,
            confidence=args.confidence,
            progress=progress,
        )
    if advice.auctions == 0:
        print(f"pingpost replay: no auctions of flow '{flow}' in that window", file=sys.stderr)
        return 1
    print_advice(advice)
    proposal = proposed_overrides(advice)
    if not proposal:
        print("Every timeout stays as it is.")
        return 0
    print(f"\nThe proposals together, replayed: {proposal}")
    result = run_replay(
        client,
        s.clickhouse.database,
        s,
        proposal,
        scope,
        seed=args.seed,
        confidence=args.confidence,
    )
    print_result(result)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from streams.tools.experiment import print_experiment, run_experiment

    s = _settings(args)
    try:
        since, until = _window(args)
    except ValueError as exc:
        print(f"pingpost experiment: {exc}", file=sys.stderr)
        return 2
    flow = args.flow or next(iter(s.flows))
    if flow not in s.flows or s.flows[flow].experiment is None:
        have = [n for n, f in s.flows.items() if f.experiment is not None]
        print(
            f"pingpost experiment: flow '{flow}' declares no experiment (flows.{flow}."
            f"experiment in {_config_path(args)}); flows with one: {', '.join(have) or 'none'}",
            file=sys.stderr,
        )
        return 2
    from clickhouse_connect.driver.exceptions import OperationalError

    client = _sync_client(args, s)
    try:
        with _chunk_progress("reading auctions") as progress:
            result = run_experiment(
                client,
                s.clickhouse.database,
                s,
                flow,
                since=since,
                until=until,
                lead_prefix=args.lead_prefix,
                seed=args.seed,
                progress=progress,
            )
    except OperationalError as exc:
        raise _no_warehouse(args, s, exc) from None
    finally:
        client.close()
    if not any(v.leads for v in result.variants):
        print(
            f"pingpost experiment: no auction of flow '{flow}' has a variant yet (in that window)",
            file=sys.stderr,
        )
        return 1
    print_experiment(result)
    return 0


def _experiments(
    client: Any, s: Settings, since: Any, until: Any, lead_prefix: str | None = None
) -> list[Any]:
    """The report's experiment section: each configured experiment that has auctions."""
    from streams.tools.experiment import run_experiment

    out = []
    for name, flow in s.flows.items():
        if flow.experiment is None:
            continue
        result = run_experiment(
            client,
            s.clickhouse.database,
            s,
            name,
            since=since,
            until=until,
            lead_prefix=lead_prefix,
        )
        if any(v.leads for v in result.variants):
            out.append(result)
    return out


class _ProgressClient:
    """A clickhouse-connect client whose queries update a status line (query N, time)."""

    def __init__(self, client: Any, status: Any) -> None:
        self._client = client
        self._status = status
        self._n = 0
        self._t0 = time.monotonic()

    def query(self, *args: Any, **kwargs: Any) -> Any:
        self._n += 1
        self._status.update(
            f"querying the warehouse: query {self._n}, {time.monotonic() - self._t0:.0f} s"
        )
        return self._client.query(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def cmd_sql(args: argparse.Namespace) -> int:
    """Run SQL against the configured ClickHouse and print the result as a table."""
    from clickhouse_connect.driver.exceptions import ClickHouseError
    from rich.console import Console
    from rich.table import Table

    s = _settings(args)
    client = _sync_client(args, s, database=s.clickhouse.database)
    try:
        res = client.query(args.query)
    except ClickHouseError as exc:
        print(f"pingpost sql: {str(exc).strip()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    t = Table(*res.column_names)
    for row in res.result_rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    Console().print(t)
    print(f"{len(res.result_rows)} row(s)")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    s = _settings(args)
    print(f"ok: {len(s.flows)} flow(s), {len(s.buyers)} buyer(s)")
    return 0


def _demo_html(console: Any, client: Any, db: str, path: Path, **kwargs: Any) -> bool:
    """The demo's last step: the same report as HTML in the run directory."""
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from streams.tools.html_report import write_html_report

    try:
        written = write_html_report(client, db, path, **kwargs)
    except (ClickHouseError, OSError) as exc:
        console.print(f"[red]could not write the HTML report {path}: {exc}[/]")
        return False
    console.print(f"[cyan]•[/] HTML report: {written}")
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    from datetime import datetime

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streams.tools import cpu
    from streams.tools.demo import PiiAudit, ProgressLines, generate_leads, push_leads, tag_leads
    from streams.tools.report import build_report, platform_unsold, print_report

    console = Console()
    t0 = time.monotonic()
    started_at = datetime.now(UTC)
    s = _settings(args)
    st = _stack(args, s)
    console.rule("[bold]pingpost demo")
    st.say = lambda m: console.print(f"[cyan]•[/] {m}")
    _up(st)
    console.print(f"[cyan]•[/] stack up in {time.monotonic() - t0:.1f}s")
    token = s.ingest.producers[0].token.get_secret_value()
    leads = generate_leads(args.leads, seed=args.seed)
    # The run's leads carry ids with its own prefix: every query below is one startsWith,
    # whatever the number of leads.
    prefix = f"demo-{started_at:%Y%m%dT%H%M%S}-{args.seed}-"
    tag_leads(leads, prefix)
    audit = None
    if s.simulator.buyers:
        audit = PiiAudit(
            [f"http://{s.simulator.host}:{b.port}" for b in s.simulator.buyers.values()],
            (lead[f] for lead in leads for f in s.flows[lead["flow"]].pii_fields if lead.get(f)),
        )
        audit.drain()  # what earlier runs left in the buyers' recordings
        audit.pings = audit.leaks = 0
    url = f"http://{s.ingest.host}:{s.ingest.port}/v1/leads"
    cpu_before = cpu.sample(st.pid_dir)
    run = asyncio.run(
        push_leads(
            url,
            token,
            leads,
            rate=args.rate,
            console=console,
            every_5s=audit.drain if audit is not None else None,
        )
    )
    if run.rejected:
        console.print(
            f"[red]{len(run.rejected)} leads rejected by ingest[/], e.g. {run.rejected[0]}"
        )
    client = _sync_client(args, s)
    db = s.clickhouse.database
    ids = run.lead_ids
    deadline = time.monotonic() + args.timeout
    settled = 0
    with Progress(
        TextColumn("waiting for auctions to settle"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("settle", total=len(ids))
        lines = ProgressLines(console, "settled", len(ids), rate=False)
        drained_at = time.monotonic()
        while time.monotonic() < deadline:
            settled = client.query(
                f"SELECT count() FROM {db}.auctions FINAL WHERE startsWith(lead_id, %(p)s)",
                parameters={"p": prefix},
            ).result_rows[0][0]
            progress.update(task, completed=settled)
            lines.update(settled)
            if settled >= len(ids):
                break
            if audit is not None and time.monotonic() - drained_at > 5:
                audit.drain()
                drained_at = time.monotonic()
            time.sleep(0.5)
    cpu_ms = cpu.per_lead_ms(cpu_before, cpu.sample(st.pid_dir), len(ids))
    if settled < len(ids):
        dead = client.query(
            f"SELECT stage, any(reason), count() FROM {db}.dead_letters FINAL GROUP BY stage"
        ).result_rows
        console.print(
            f"[red]only {settled} of {len(ids)} auctions settled within "
            f"{args.timeout}s[/]; logs are in {st.log_dir}"
        )
        for stage, reason, n in dead:
            console.print(f"  {n} records dead-lettered by {stage}, e.g.: {reason[:300]}")
        client.close()
        return 1
    report = build_report(client, db, lead_prefix=prefix)
    (dead_letters,) = client.query(
        f"SELECT count() FROM {db}.dead_letters FINAL WHERE at >= %(t)s",
        parameters={"t": started_at},
    ).result_rows[0]
    span = (
        (report.last_settled - report.first_received).total_seconds()
        if report.first_received and report.last_settled
        else 0.0
    )
    if audit is not None:
        audit.drain()
    pings, leaks, missed = (audit.pings, audit.leaks, audit.missed) if audit else (0, 0, 0)
    wall = time.monotonic() - t0
    extra = {
        "leads pushed / accepted": f"{len(leads):,} / {len(ids):,} in {run.push_seconds:.1f}s "
        f"({len(ids) / run.push_seconds:.0f}/s offered)",
        "429 answers (over capacity), retried": f"{run.refused:,}",
        "sustained (first receipt → last settle)": f"{len(ids) / span:.1f} leads/s over {span:.1f}s"
        if span
        else "-",
        "PII audit of pings received by buyers": f"{leaks} leaks in {pings:,} pings"
        + (f" ({missed:,} not audited: dropped by a buyer's recorder)" if missed else ""),
        "CPU per lead, all stack processes": cpu.format_per_lead(cpu_ms),
        "demo wall time": f"{wall:.1f}s",
    }
    title = f"pingpost demo — {len(ids):,} solar leads"
    print_report(report, console, title=title, extra=extra)
    experiments = _experiments(client, s, started_at, None, prefix)
    if experiments:
        from streams.tools.experiment import print_experiment

        for result in experiments:
            print_experiment(result, console)
    html_ok = _demo_html(
        console,
        client,
        db,
        RUN_DIR / "report.html",
        lead_prefix=prefix,
        since=started_at,
        summary=report,
        title=title,
        experiments=experiments,
        extra=extra,
    )
    client.close()
    # Unsold because the market said no is fine; unsold because the platform failed is not.
    internal = platform_unsold(report.unsold_reasons)
    checks = {
        "every lead has one settled auction": report.auctions == len(ids) == len(leads),
        "every sale has an accepted post": report.sold_without_accepted_post == 0,
        "no PII in any ping": leaks == 0 and missed == 0,
        "no record dead-lettered": dead_letters == 0,
        "no lead unsold for a platform reason": internal == 0,
        "HTML report written": html_ok,
    }
    ok = all(checks.values())
    for what, passed in checks.items():
        console.print(f"  {'[green]✓[/]' if passed else '[red]✗[/]'} {what}")
    console.print("[green]checks passed[/]" if ok else "[red]checks FAILED[/]")
    console.print(
        f"The stack is still running (logs in {st.log_dir}). Explore with "
        "`.venv/bin/pingpost report`; stop it with [bold]make down[/]."
    )
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pingpost", description="real-time ping-post lead distribution on Kafka"
    )
    p.add_argument("--config", help="YAML config (default $PINGPOST_CONFIG or config/demo.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole local stack with a demo market and report")
    d.add_argument("--leads", type=int, default=1000)
    d.add_argument("--rate", type=float, default=50.0, help="leads per second offered")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--timeout", type=float, default=300.0)
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser("up", help="start the local stack")
    u.add_argument("--no-buyers", action="store_true", help="do not start simulated buyers")
    u.add_argument("--workers", type=int, default=1, help="auction workers to run")
    u.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=cmd_down)
    sub.add_parser("status", help="what is running").set_defaults(func=cmd_status)

    w = sub.add_parser("worker", help="run a Faust worker")
    w.add_argument("--role", choices=["auction", "sink", "metrics"], default="auction")
    w.add_argument(
        "--web-port",
        type=int,
        default=None,
        help="Faust web port (0: off; default: worker.web_port)",
    )
    w.add_argument(
        "--instance-id",
        default=None,
        help="join the consumer group as this static member (Kafka's "
        "group.instance.id): restarted under the same id, the worker gets its "
        "partitions back without a rebalance; unique per running worker",
    )
    w.add_argument("--loglevel", default="info")
    w.set_defaults(func=cmd_worker)

    sv = sub.add_parser("supervise", help="run a pingpost command; restart it when it fails")
    sv.add_argument(
        "command_line",
        nargs=argparse.REMAINDER,
        help="the command, after --, e.g. -- worker --role sink",
    )
    sv.set_defaults(func=cmd_supervise)

    i = sub.add_parser("ingest", help="run the HTTP ingest")
    i.add_argument("--port", type=int, default=None)
    i.set_defaults(func=cmd_ingest)

    wh = sub.add_parser("warehouse", help="run the embedded warehouse (chDB over HTTP)")
    wh.add_argument("--data-dir", default=None)
    wh.add_argument("--port", type=int, default=None)
    wh.set_defaults(func=cmd_warehouse)

    b = sub.add_parser("buyers", help="simulated buyers")
    b.add_argument("action", choices=["simulate"])
    b.set_defaults(func=cmd_buyers)

    k = sub.add_parser("kafka", help="the local Kafka broker")
    k.add_argument("action", choices=["start", "stop"])
    k.set_defaults(func=cmd_kafka)

    t = sub.add_parser("topics", help="Kafka topics")
    t.add_argument("action", choices=["create"])
    t.set_defaults(func=cmd_topics)

    sub.add_parser("migrate", help="apply ClickHouse migrations").set_defaults(func=cmd_migrate)
    r = sub.add_parser("report", help="print the report from ClickHouse, or write it as HTML")
    r.add_argument("--html", metavar="PATH", help="write a self-contained HTML report here")
    r.add_argument(
        "--since",
        help="leads received from (ISO 8601, UTC if no offset, or a "
        "duration ago: 15m, 2h, 7d); default: the beginning",
    )
    r.add_argument("--until", help="leads received before (same forms); default: now")
    r.set_defaults(func=cmd_report)
    rp = sub.add_parser(
        "replay", help="decide recorded auctions again under another strategy and compare"
    )
    rp.add_argument(
        "--strategy",
        metavar="FILE",
        help="YAML: the flow keys to override (strategy, floors, waves, deadline_ms, "
        "safety_margin_ms, buyers.<id>.timeout_ms); see docs/strategy-lab.md",
    )
    rp.add_argument("--since", help="auctions of leads received from (as for report)")
    rp.add_argument("--until", help="auctions of leads received before (as for report)")
    rp.add_argument("--lead-prefix", help="only leads whose id starts so (one demo run)")
    rp.add_argument("--leads", metavar="FILE", help="only these leads: one lead id per line")
    rp.add_argument(
        "--advise-timeouts",
        action="store_true",
        help="per buyer (and for the flow's deadline): what each timeout would have earned, "
        "a proposal, and the proposals replayed together",
    )
    rp.add_argument("--flow", help="--advise-timeouts: the flow (default: the first)")
    rp.add_argument("--html", metavar="PATH", help="write the replay as a self-contained page")
    rp.add_argument(
        "--variant",
        help="only the auctions of this experiment variant ('' for leads in no experiment)",
    )
    rp.add_argument("--seed", type=int, default=0, help="seed of the models and the bootstrap")
    rp.add_argument("--resamples", type=int, default=400, help="bootstrap resamples")
    rp.add_argument("--confidence", type=float, default=0.95, help="interval level")
    rp.set_defaults(func=cmd_replay)
    ex = sub.add_parser(
        "experiment", help="a flow's live A/B test: each variant against the control"
    )
    ex.add_argument("--flow", help="the flow (default: the first configured)")
    ex.add_argument("--since", help="leads received from (as for report)")
    ex.add_argument("--until", help="leads received before (as for report)")
    ex.add_argument("--lead-prefix", help="only leads whose id starts so (one demo run)")
    ex.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    ex.set_defaults(func=cmd_experiment)
    sub.add_parser("check-config", help="validate the config").set_defaults(func=cmd_check_config)
    q = sub.add_parser("sql", help="run SQL against the configured ClickHouse, print a table")
    q.add_argument("query")
    q.set_defaults(func=cmd_sql)
    return p


def main(argv: list[str] | None = None) -> int:
    # Every process of the stack (and the broker it launches) creates files readable by
    # their owner only: the run dir holds PII (broker log segments, Faust data, logs) and
    # secrets. Explicit modes on the directories back this up where code creates them.
    os.umask(0o077)
    args = build_parser().parse_args(argv)
    # Repeated Kafka client errors once per 10 s with a count, in every process.
    from streams.runtime.quiet import install

    install()
    if args.command != "worker":
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"pingpost: {exc}", file=sys.stderr)
        return 2
    except PatchVersionError as exc:
        print(f"pingpost {args.command}: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"pingpost {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
