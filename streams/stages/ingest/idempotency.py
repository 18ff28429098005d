"""Safe producer retries (CONTRACT §1): one lead per ``Idempotency-Key``, whatever happens.

A producer that times out and retries must never create a second lead. Three layers make
that so, from the cheapest to the one that always holds:

1. **The lead id is derived from the key**: ``uuid5(producer, key)``. Any ingest process,
   before or after a restart, gives a repeat the first attempt's ``lead_id``; a lead that
   carries its own ``lead_id`` is keyed by it.
2. **The ingest process remembers** (:class:`LeadMemory`) what it published and the outcomes
   it saw on the results topic (reloaded from Kafka at start-up), so a repeat it knows about
   is answered without publishing anything.
3. **The redact stage drops a lead id it has already seen** within
   ``ingest.idempotency_window_s`` (a changelogged table: the memory lives in Kafka, shared by
   every ingest process and kept across restarts). This is what makes a repeat safe when
   layer 2 cannot know it: another ingest process, a restart, or a first attempt that timed
   out at ingest (``503``) but reached Kafka later.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "KEY_HEADER",
    "KeyError_",
    "lead_id_for_key",
    "check_key",
    "fingerprint",
    "Remembered",
    "LeadMemory",
]

KEY_HEADER = "Idempotency-Key"
_KEY_NS = uuid.UUID("3f1d2c4b-8a9e-4b7c-9d2e-6a5f4e3d2c1b")
_MAX_KEY = 255


class KeyError_(ValueError):  # not the builtin KeyError
    """An unusable ``Idempotency-Key`` header."""


def check_key(key: str) -> str:
    """The key as given, or :class:`KeyError_` saying why it cannot be used."""
    if not key or len(key) > _MAX_KEY:
        raise KeyError_(f"must be 1-{_MAX_KEY} characters")
    if any(not (0x20 < ord(ch) < 0x7F) for ch in key):
        raise KeyError_("must be printable ASCII without spaces")
    return key


def lead_id_for_key(producer: str, key: str) -> str:
    """The lead id of every request with ``key`` from ``producer`` (keys are per producer:
    two producers may use the same key for different people)."""
    return str(uuid.uuid5(_KEY_NS, f"{producer}\x00{key}"))


def fingerprint(raw: Any) -> str:
    """What a repeat must match: the lead as sent (key order does not matter)."""
    return hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


@dataclass
class Remembered:
    """What one ingest process knows of a lead id."""

    fingerprint: str | None = None
    #: Set once Kafka acknowledged the lead (by any attempt of this process).
    published: bool = False
    #: The publish under way (a concurrent repeat waits for it instead of publishing again).
    publishing: asyncio.Future[None] | None = None
    #: The settled outcome (an ``AuctionResult`` record), once seen on the results topic.
    result: dict[str, Any] | None = None
    #: Futures of ``?wait=true`` requests waiting for the outcome.
    waiters: list[asyncio.Future[dict[str, Any]]] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)


class LeadMemory:
    """Bounded memory of lead ids, by count and age (oldest forgotten first). Forgetting is
    safe: the redact stage still drops the repeat (layer 3), it only costs a publish."""

    def __init__(self, max_entries: int = 200_000, max_age_s: float = 86_400.0) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._entries: OrderedDict[str, Remembered] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, lead_id: str) -> Remembered | None:
        self._expire()
        return self._entries.get(lead_id)

    def entry(self, lead_id: str) -> Remembered:
        """The entry of ``lead_id``, created if new."""
        self._expire()
        got = self._entries.get(lead_id)
        if got is None:
            got = self._entries[lead_id] = Remembered()
            while len(self._entries) > self.max_entries:
                self._pop_oldest()
        return got

    def settled(self, result: dict[str, Any]) -> None:
        """An outcome seen on the results topic: remembered, and handed to its waiters."""
        e = self.entry(result["lead_id"])
        e.result = result
        e.published = True
        for w in e.waiters:
            if not w.done():
                w.set_result(result)
        e.waiters.clear()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.max_age_s
        while self._entries:
            first = next(iter(self._entries.values()))
            if first.at >= cutoff or first.waiters or first.publishing is not None:
                break
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, e = self._entries.popitem(last=False)
        for w in e.waiters:  # never strand a request: an empty answer means "pending"
            if not w.done():
                w.set_result({})
