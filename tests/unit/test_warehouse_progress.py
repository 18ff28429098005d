"""connectors.warehouse.progress: a head sent in two parts over a real aiohttp server.

The warehouse writes the status line, its first headers and progress lines itself, then lets
aiohttp finish the head (``_write_headers``, the one aiohttp internal it overrides): this
checks on the pinned aiohttp that an HTTP client reads one well-formed response either way
(a whole body, a chunked stream, an error after progress) and reuses the connection after it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from connectors.warehouse.progress import EarlyHead, progress_interval

FIRST = {"X-ClickHouse-Query-Id": "q1", "Content-Type": "text/plain; charset=UTF-8"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/"

    yield start
    for runner in runners:
        await runner.cleanup()


async def _progress_then(head: EarlyHead, n: int) -> None:
    for i in range(n):
        head.progress({"read_rows": str(i)})
        await asyncio.sleep(0)


async def test_a_whole_response_after_progress_lines(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        head = EarlyHead(request, FIRST)
        await _progress_then(head, 3)
        return head.response(body=b"result\n", headers={**FIRST, "X-ClickHouse-Summary": "{}"})

    url = await serve(handler)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the connection is reused: the response ended where it should
            async with http.post(url, data=b"q") as r:
                assert r.status == 200
                assert [
                    json.loads(v)["read_rows"] for v in r.headers.getall("X-ClickHouse-Progress")
                ] == ["0", "1", "2"]
                assert r.headers.getall("Content-Type") == ["text/plain; charset=UTF-8"]
                assert r.headers["X-ClickHouse-Summary"] == "{}"
                assert await r.read() == b"result\n"


async def test_a_chunked_stream_after_progress_lines(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        head = EarlyHead(request, FIRST)
        await _progress_then(head, 2)
        response = head.stream_response(headers=FIRST)
        await response.prepare(request)
        for part in (b"a\n", b"b\n", b"c\n"):
            await response.write(part)
        await response.write_eof()
        return response

    url = await serve(handler)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(url, data=b"q") as r:
                assert r.headers["Transfer-Encoding"] == "chunked"
                assert len(r.headers.getall("X-ClickHouse-Progress")) == 2
                assert await r.read() == b"a\nb\nc\n"


async def test_an_error_after_progress_keeps_200_and_says_so_in_its_header(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        head = EarlyHead(request, FIRST)
        head.start(lambda: {"read_rows": "1"}, 0.01)
        while not head.started:
            await asyncio.sleep(0.01)
        await head.stop()
        return head.response(
            status=500,
            body=b"Code: 395. DB::Exception: boom\n",
            headers={"X-ClickHouse-Exception-Code": "395"},
        )

    url = await serve(handler)
    async with aiohttp.ClientSession() as http, http.post(url, data=b"q") as r:
        assert r.status == 200  # the status line went out with the first progress line
        assert r.headers["X-ClickHouse-Exception-Code"] == "395"
        assert await r.read() == b"Code: 395. DB::Exception: boom\n"


async def test_without_progress_it_is_a_plain_response(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return EarlyHead(request, FIRST).response(status=404, body=b"no\n", headers=FIRST)

    url = await serve(handler)
    async with aiohttp.ClientSession() as http, http.post(url, data=b"q") as r:
        assert (r.status, await r.read()) == (404, b"no\n")


def test_the_interval_setting() -> None:
    assert progress_interval({}) is None
    assert progress_interval({"send_progress_in_http_headers": "0"}) is None
    assert progress_interval({"send_progress_in_http_headers": "1"}) == 0.1
    assert (
        progress_interval(
            {"send_progress_in_http_headers": "1", "http_headers_progress_interval_ms": "2500"}
        )
        == 2.5
    )
    with pytest.raises(ValueError, match="http_headers_progress_interval_ms"):
        progress_interval(
            {"send_progress_in_http_headers": "1", "http_headers_progress_interval_ms": "soon"}
        )


async def test_a_client_gone_after_progress_is_a_connection_error(serve: Serve) -> None:
    """The rest of the head for a client that went away: ConnectionResetError, which the
    warehouse treats as a client gone (not an unexpected error with a traceback)."""
    seen: list[BaseException] = []
    done = asyncio.Event()

    async def until_closed(request: web.Request) -> None:
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.005)

    async def handler(request: web.Request) -> web.StreamResponse:
        head = EarlyHead(request, FIRST)
        head.progress({"read_rows": "0"})
        await asyncio.wait_for(until_closed(request), 5)
        response = head.response(body=b"late\n", headers=FIRST)
        try:
            await response.prepare(request)
        except Exception as exc:
            seen.append(exc)
        done.set()
        return response

    url = await serve(handler)
    host, port = url[len("http://") : -1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nq")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(done.wait(), 5)
    assert len(seen) == 1 and isinstance(seen[0], ConnectionResetError), seen
