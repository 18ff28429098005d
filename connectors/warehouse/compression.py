"""HTTP body compression: decoding request bodies (concatenated lz4/zstd/gzip/deflate frames) and
encoding responses in the coding the client accepts."""

from __future__ import annotations

import zlib
from typing import Any, Final

import lz4.frame  # type: ignore[import-untyped]
import zstandard

from connectors.warehouse.errors import (
    CANNOT_DECOMPRESS,
    UNKNOWN_COMPRESSION_METHOD,
    ClickHouseError,
)

__all__ = ["BodyDecoder", "IdentityDecoder", "ResponseEncoder", "choose_encoding"]


class BodyDecoder:
    """Incremental decoder for a request body of concatenated lz4/zstd/gzip/deflate frames."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._active: Any = None
        if encoding not in ("lz4", "zstd", "gzip", "x-gzip", "deflate"):
            raise ClickHouseError.server(
                UNKNOWN_COMPRESSION_METHOD, f"Unsupported Content-Encoding: {encoding!r}"
            )

    def _new_frame(self, first: bytes) -> Any:
        if self.encoding == "lz4":
            return lz4.frame.LZ4FrameDecompressor()
        if self.encoding == "zstd":
            return zstandard.ZstdDecompressor().decompressobj()
        if self.encoding in ("gzip", "x-gzip"):
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        # HTTP "deflate" is zlib-wrapped (RFC 9110), but some clients send raw deflate.
        zlib_header = (
            len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        )
        return zlib.decompressobj(wbits=zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)

    def decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        try:
            while data:
                if self._active is None:
                    self._active = self._new_frame(data)
                out.append(self._active.decompress(data))
                if self._active.eof:
                    # One frame per block: the next frame starts in the leftover bytes.
                    data = self._active.unused_data
                    self._active = None
                else:
                    data = b""
        except ClickHouseError:
            raise
        except Exception as exc:
            raise ClickHouseError.server(
                CANNOT_DECOMPRESS, f"Cannot decode {self.encoding} request body: {exc}"
            ) from exc
        return b"".join(out)

    def finish(self) -> None:
        if self._active is not None:  # a frame started but never ended
            raise ClickHouseError.server(
                CANNOT_DECOMPRESS, f"Truncated {self.encoding} request body"
            )


class IdentityDecoder:
    def decompress(self, data: bytes) -> bytes:
        return data

    def finish(self) -> None:
        return None


_RESPONSE_ENCODINGS: Final = ("lz4", "zstd", "gzip", "deflate")


class ResponseEncoder:
    """One compressed stream (a single frame) across all chunks of a response.

    clickhouse-connect's sync client feeds the whole response to one decompressor, so the
    response must be one lz4/zstd frame or gzip member, flushed per chunk when streaming.
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._started = False
        self._lz4: Any = None
        self._zstd: Any = None
        self._zlib: Any = None
        if encoding == "lz4":
            self._lz4 = lz4.frame.LZ4FrameCompressor()
        elif encoding == "zstd":
            # Level 1: on loopback the CPU spent compressing is the cost that matters.
            self._zstd = zstandard.ZstdCompressor(level=1).compressobj()
        elif encoding == "gzip":
            self._zlib = zlib.compressobj(3, wbits=16 + zlib.MAX_WBITS)
        else:
            self._zlib = zlib.compressobj(3, wbits=zlib.MAX_WBITS)

    def compress(self, data: bytes, flush: bool = True) -> bytes:
        """Compress one chunk; ``flush`` makes it decodable now (a streamed response)."""
        out: bytes
        if self._lz4 is not None:
            out = self._lz4_begin() + self._lz4.compress(data)
        elif self._zstd is not None:
            out = self._zstd.compress(data)
            if flush:
                out += self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        else:
            out = self._zlib.compress(data)
            if flush:
                out += self._zlib.flush(zlib.Z_SYNC_FLUSH)
        return out

    def finish(self) -> bytes:
        out: bytes
        if self._lz4 is not None:
            out = self._lz4_begin() + self._lz4.flush()
        elif self._zstd is not None:
            out = self._zstd.flush()
        else:
            out = self._zlib.flush()
        return out

    def _lz4_begin(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        head: bytes = self._lz4.begin()
        return head

    def whole(self, data: bytes) -> bytes:
        return self.compress(data, flush=False) + self.finish()


def choose_encoding(accept_encoding: str) -> str | None:
    """First supported coding in the client's Accept-Encoding, in the client's order.

    clickhouse-connect lists its codings by preference (lz4 first), which is also the
    cheapest choice on loopback. ``q=0`` excludes a coding.
    """
    for item in accept_encoding.split(","):
        name, *params = item.split(";")
        name = name.strip().lower()
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality <= 0:
            continue
        if name == "x-gzip":
            name = "gzip"
        if name in _RESPONSE_ENCODINGS:
            return name
    return None
