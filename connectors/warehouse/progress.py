"""``send_progress_in_http_headers``: ``X-ClickHouse-Progress`` lines while a query runs.

A ClickHouse server answering with progress headers writes its status line and first headers
as soon as the first progress is due, then one ``X-ClickHouse-Progress: {...}`` line every
``http_headers_progress_interval_ms`` until the body starts, then the rest of the headers
(``X-ClickHouse-Summary``...). A client waiting on a long query (clickhouse-connect asks for
this on every query, with an interval just under its read timeout) so sees bytes before the
result, and its read timeout does not fire. The status is then 200 whatever follows: an error
that comes later is told by its ``X-ClickHouse-Exception-Code`` header and the body, as a
server does.

aiohttp writes a response's status line and headers in one piece, so :class:`EarlyHead`
writes the first part to the connection itself, and :class:`ContinuedResponse` /
:class:`ContinuedStreamResponse` write only the headers not sent yet when aiohttp would
write the whole head (``_write_headers``, the one aiohttp internal used here; the pinned
aiohttp's, checked by ``tests/unit/test_warehouse_progress.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Final

from aiohttp import web

__all__ = [
    "ContinuedResponse",
    "ContinuedStreamResponse",
    "EarlyHead",
    "progress_interval",
]

#: ClickHouse's default ``http_headers_progress_interval_ms``.
DEFAULT_INTERVAL_MS: Final = 100
#: A header value is one line; no JSON we write has a line break, but never trust that.
_HEADER_SAFE: Final = str.maketrans({"\r": " ", "\n": " "})


def progress_interval(params: Mapping[str, str]) -> float | None:
    """Seconds between progress headers, or None when the request did not ask for them."""
    if params.get("send_progress_in_http_headers", "0") not in ("1", "true", "True"):
        return None
    raw = params.get("http_headers_progress_interval_ms") or str(DEFAULT_INTERVAL_MS)
    try:
        ms = int(raw)
    except ValueError:
        raise ValueError(
            f"http_headers_progress_interval_ms must be a number, not {raw!r}"
        ) from None
    return max(ms, 1) / 1000


def _line(name: str, value: str) -> bytes:
    return f"{name}: {value.translate(_HEADER_SAFE)}\r\n".encode("latin-1", "replace")


class EarlyHead:
    """The part of a response's head that goes out before the result: the status line (200),
    the headers known then, and progress lines."""

    def __init__(self, request: web.Request, headers: Mapping[str, str]) -> None:
        self._request = request
        self._headers = dict(headers)
        #: Lower-cased names already on the wire (the final part leaves them out).
        self.sent: frozenset[str] = frozenset()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return bool(self.sent)

    def progress(self, summary: Mapping[str, str]) -> None:
        """Write one ``X-ClickHouse-Progress`` line (the status line and first headers
        before the first)."""
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return
        out = bytearray()
        if not self.started:
            version = self._request.version
            out += f"HTTP/{version.major}.{version.minor} 200 OK\r\n".encode()
            for name, value in self._headers.items():
                out += _line(name, value)
            self.sent = frozenset(k.lower() for k in self._headers)
        out += _line("X-ClickHouse-Progress", json.dumps(summary, separators=(",", ":")))
        transport.write(bytes(out))

    def start(self, summary: Callable[[], Mapping[str, str]], interval_s: float) -> None:
        """Write ``summary()`` every ``interval_s`` until :meth:`stop`."""

        async def tick() -> None:
            while True:
                await asyncio.sleep(interval_s)
                self.progress(summary())

        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(tick())

    async def stop(self) -> None:
        """No more progress lines (before the rest of the head goes out)."""
        task, self._ticker = self._ticker, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def response(self, *, status: int = 200, **kwargs: object) -> web.Response:
        """The response to finish with: the rest of the head, then the body (the status
        line went out already when the head started)."""
        if not self.started:
            return web.Response(status=status, **kwargs)  # type: ignore[arg-type]
        response = ContinuedResponse(**kwargs)  # type: ignore[arg-type]
        response.sent_headers = self.sent
        return response

    def stream_response(self, **kwargs: object) -> web.StreamResponse:
        if not self.started:
            return web.StreamResponse(**kwargs)  # type: ignore[arg-type]
        response = ContinuedStreamResponse(**kwargs)  # type: ignore[arg-type]
        response.sent_headers = self.sent
        return response


class _Continued(web.StreamResponse):
    sent_headers: frozenset[str] = frozenset()

    async def _write_headers(self) -> None:
        # aiohttp's own _write_headers hands the status line and every header to the writer;
        # here the status line and ``sent_headers`` are on the wire already.
        request = self._req
        if request is None or request.transport is None or request.transport.is_closing():
            # as aiohttp's own writer: the client went away (the handler logs it as such)
            raise ConnectionResetError("the client went away before the result")
        out = bytearray()
        for name, value in self.headers.items():
            if name.lower() not in self.sent_headers:
                out += _line(name, value)
        out += b"\r\n"
        request.transport.write(bytes(out))


class ContinuedResponse(_Continued, web.Response):
    """A :class:`web.Response` whose status line and first headers went out before."""


class ContinuedStreamResponse(_Continued):
    """A :class:`web.StreamResponse` whose status line and first headers went out before."""
