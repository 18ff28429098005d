"""The cap ledger of one buyer (issue 3, rule 7), pure and JSON-serialisable: it is the caps
table's value. Reservations, commits, releases, expiry and the counters of the current
period; ``streams.stages.caps`` owns the table and the protocol around it (module docstring
there)."""

from __future__ import annotations

from typing import Any

from streams.rules import selling as rules
from streams.settings import BuyerCaps

__all__ = [
    "DONE_KEEP",
    "HOLD_TTL_MS",
    "commit",
    "counters",
    "expire",
    "hold_ttl_ms",
    "new_ledger",
    "next_expiry",
    "release",
    "reserve",
]


#: A reservation not committed or released within this long is dropped.
HOLD_TTL_MS = 120_000


#: How long, and how many, settled leads a ledger remembers, to make redelivered requests
#: no-ops. The ledger is one table value (written to the changelog on every change), so it is
#: kept small. A request redelivered after that errs on the safe side: a commit counts again
#: (the buyer gets fewer leads, never more), a reserve makes a hold that expires.
DONE_TTL_MS = HOLD_TTL_MS


DONE_KEEP = 1000


def hold_ttl_ms(post_timeout_ms: int, floor_ms: int = HOLD_TTL_MS) -> int:
    """How long a buyer's reservation lives: at least ``floor_ms`` (``worker.cap_hold_s``,
    120 s by default), and longer than two of the buyer's post timeouts plus 5 s. (An
    attempt may now ask up to six times: with the 120 s floor that matters only for buyers
    whose post timeout passes ~19 s; noted in issue 10.) Not shorter: a post recorded
    as pending when its worker crashed is resolved by the next owner, after a restart and a
    recovery, and counted then whatever the ledger says — had its hold expired meanwhile,
    the slot could have gone to another lead and the cap been exceeded (seen at 11 s: 126
    of 120 in the churn test)."""
    return max(floor_ms, 2 * post_timeout_ms + 5_000)


def expire(led: dict[str, Any], at_ms: int) -> bool:
    """Drop the reservations past their expiry; whether any was dropped."""
    n = len(led["holds"])
    _expire(led, at_ms)
    return len(led["holds"]) != n


def next_expiry(led: dict[str, Any]) -> int | None:
    """When the ledger's next reservation expires (None: no reservation)."""
    return min((h["exp"] for h in led["holds"].values()), default=None)


def new_ledger() -> dict[str, Any]:
    # counted: accepted posts per period key; holds: lead -> reservation; done: lead ->
    # [how it ended ("committed" | "released"), when], oldest first.
    return {"hours": {}, "days": {}, "spend": {}, "holds": {}, "done": {}}


def _expire(led: dict[str, Any], at_ms: int) -> None:
    for lead in [k for k, h in led["holds"].items() if h["exp"] <= at_ms]:
        del led["holds"][lead]


def _prune(led: dict[str, Any], hour: str, day: str, now_ms: int) -> None:
    """Keep only the current periods' counters (and those of outstanding holds)."""
    keep_h = {hour} | {h["hour"] for h in led["holds"].values()}
    keep_d = {day} | {h["day"] for h in led["holds"].values()}
    led["hours"] = {k: v for k, v in led["hours"].items() if k in keep_h}
    led["days"] = {k: v for k, v in led["days"].items() if k in keep_d}
    led["spend"] = {k: v for k, v in led["spend"].items() if k in keep_d}
    while led["done"] and (
        len(led["done"]) > DONE_KEEP or next(iter(led["done"].values()))[1] < now_ms - DONE_TTL_MS
    ):
        del led["done"][next(iter(led["done"]))]


def counters(
    led: dict[str, Any], caps: BuyerCaps, at_ms: int
) -> tuple[str, str, rules.BuyerCounters]:
    """The current (hour, day) keys and what counts against the caps there: accepted posts
    plus outstanding reservations."""
    hour, day = rules.cap_periods(caps, at_ms)
    holds = [h for h in led["holds"].values() if h["exp"] > at_ms]
    return (
        hour,
        day,
        rules.BuyerCounters(
            leads_hour=led["hours"].get(hour, 0) + sum(1 for h in holds if h["hour"] == hour),
            leads_day=led["days"].get(day, 0) + sum(1 for h in holds if h["day"] == day),
            spend_day=led["spend"].get(day, 0.0)
            + sum(h["price"] for h in holds if h["day"] == day),
        ),
    )


def reserve(
    led: dict[str, Any],
    caps: BuyerCaps,
    lead_id: str,
    price: float,
    at_ms: int,
    ttl_ms: int = HOLD_TTL_MS,
) -> tuple[bool, str]:
    """Hold a slot for posting ``lead_id`` at ``price``: ``(granted, reason)``."""
    _expire(led, at_ms)
    if lead_id in led["holds"]:
        return True, ""  # a redelivered request: the same hold
    done = (led["done"].get(lead_id) or [None])[0]
    if done == "committed":
        return True, ""  # already counted (a replayed waterfall re-posting with the same key)
    if done == "released":
        return False, "this lead's reservation was already released"
    hour, day, c = counters(led, caps, at_ms)
    why = rules.cap_allows(caps, c, price)
    if why is not None:
        _prune(led, hour, day, at_ms)
        return False, why
    led["holds"][lead_id] = {"price": price, "hour": hour, "day": day, "exp": at_ms + ttl_ms}
    _prune(led, hour, day, at_ms)
    return True, ""


def commit(led: dict[str, Any], caps: BuyerCaps, lead_id: str, price: float, at_ms: int) -> None:
    """Count an accepted (or ambiguous) post: in the periods it was reserved in."""
    if (led["done"].get(lead_id) or [None])[0] == "committed":
        return  # redelivered
    hold = led["holds"].pop(lead_id, None)
    if hold is not None:
        hour, day, price = hold["hour"], hold["day"], hold["price"]
    else:  # the reservation expired: the sale is real, count it now
        hour, day = rules.cap_periods(caps, at_ms)
    led["hours"][hour] = led["hours"].get(hour, 0) + 1
    led["days"][day] = led["days"].get(day, 0) + 1
    led["spend"][day] = round(led["spend"].get(day, 0.0) + price, 6)
    led["done"].pop(lead_id, None)
    led["done"][lead_id] = ["committed", at_ms]
    cur_hour, cur_day = rules.cap_periods(caps, at_ms)
    _prune(led, cur_hour, cur_day, at_ms)


def release(led: dict[str, Any], lead_id: str, at_ms: int = 0) -> None:
    """Free a reservation whose post was rejected or failed (no-op once committed)."""
    if (led["done"].get(lead_id) or [None])[0] == "committed":
        return
    led["holds"].pop(lead_id, None)
    led["done"].pop(lead_id, None)
    led["done"][lead_id] = ["released", at_ms]
