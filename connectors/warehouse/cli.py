"""The warehouse as a process: ``python -m connectors.warehouse`` (:func:`main`) parses the command
line and :func:`run` serves until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Final, NoReturn

from connectors.warehouse.engine import DEFAULT_MAX_POOL_SIZE
from connectors.warehouse.errors import DataDirInUseError, WarehouseError
from connectors.warehouse.server import EmbeddedWarehouse

__all__ = ["EXIT_DATA_DIR_IN_USE", "main", "run"]

logger = logging.getLogger("pingpost.warehouse")

EXIT_DATA_DIR_IN_USE: Final = 3
#: The environment variable holding the password queries must carry (unset or empty: none).
PASSWORD_ENV: Final = "PINGPOST_WAREHOUSE_PASSWORD"


async def _serve(
    data_dir: str,
    host: str,
    port: int,
    pool_size: int,
    max_pool_size: int,
    user: str,
    password: str,
) -> None:
    warehouse = EmbeddedWarehouse(
        data_dir, host, port, pool_size, max_pool_size=max_pool_size, user=user, password=password
    )
    await warehouse.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"warehouse listening on {warehouse.url} (data: {warehouse.data_dir})", flush=True)
    try:
        await stop.wait()
        logger.info("shutting down: finishing in-flight queries")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await warehouse.stop()


def run(
    data_dir: str,
    host: str = "127.0.0.1",
    port: int = 8123,
    pool_size: int = 4,
    max_pool_size: int = DEFAULT_MAX_POOL_SIZE,
    user: str = "default",
    password: str = "",
) -> None:
    """Serve until SIGTERM/SIGINT, then shut down cleanly. Raises ``WarehouseError``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        asyncio.run(_serve(data_dir, host, port, pool_size, max_pool_size, user, password))
    else:
        uvloop.run(_serve(data_dir, host, port, pool_size, max_pool_size, user, password))


def _fail(message: str, code: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connectors.warehouse",
        description="Embedded ClickHouse warehouse: owns a chDB data directory"
        " and serves ClickHouse's HTTP interface.",
    )
    parser.add_argument(
        "--data-dir", required=True, help="chDB data directory (created if missing)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: loopback; set PINGPOST_WAREHOUSE_PASSWORD before binding "
        "elsewhere: queries must then carry --user and that password)",
    )
    parser.add_argument(
        "--port", type=int, default=8123, help="HTTP port (default 8123, 0 picks a free one)"
    )
    parser.add_argument(
        "--pool-size", type=int, default=4, help="chDB sessions opened at start (default 4)"
    )
    parser.add_argument(
        "--max-pool-size",
        type=int,
        default=DEFAULT_MAX_POOL_SIZE,
        help="sessions the pool may grow to when all are busy: requests running at once "
        f"outside named sessions (default {DEFAULT_MAX_POOL_SIZE})",
    )
    parser.add_argument(
        "--user",
        default="default",
        help="the user queries must name when a password is set (default: default)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        # The password only from the environment: a command line is visible to every user.
        password = os.environ.get(PASSWORD_ENV, "")
        run(
            args.data_dir,
            args.host,
            args.port,
            args.pool_size,
            args.max_pool_size,
            args.user,
            password,
        )
    except DataDirInUseError as exc:
        _fail(str(exc), EXIT_DATA_DIR_IN_USE)
    except (WarehouseError, OSError) as exc:
        _fail(str(exc), 1)
    return 0
