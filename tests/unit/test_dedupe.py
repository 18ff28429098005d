"""Duplicate leads: the identity and the owner's decision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.rules.dedupe import decide, identity_of, window_label
from streams.settings import DuplicatesConfig, parse_settings

RAW = yaml.safe_load(Path("config/demo.yaml").read_text())
RAW["flows"]["solar"]["duplicates"] = {"fields": ["email", "phone"], "window_s": 86400}
S = parse_settings(RAW, env={})
REJECT = DuplicatesConfig(fields=["email", "phone"], window_s=3600, action="reject")
SKIP = DuplicatesConfig(fields=["email", "phone"], window_s=3600, action="skip_buyers")
H = 3_600_000


def ident(email: str, phone: str, **hashes: Any) -> str | None:
    from streams.rules.leads import pii_hash

    key = S.privacy.hash_key.get_secret_value().encode()
    pii = {"email": pii_hash(key, "email", email), "phone": pii_hash(key, "phone", phone)}
    return identity_of(S, "solar", {"email": email, "phone": phone}, {**pii, **hashes})


def test_identity_normalises_and_never_holds_the_values() -> None:
    a = ident("Ada@Example.com ", "+1 (310) 555-0100")
    assert a == ident("ada@example.com", "13105550100")
    assert a != ident("ada@example.com", "13105550101")
    assert a is not None and "ada" not in a and "310" not in a and len(a) == 64
    # another flow or another key: another identity
    raw = yaml.safe_load(yaml.safe_dump(RAW))
    raw["privacy"] = {"hash_key": "other"}
    s2 = parse_settings(raw, env={})
    assert identity_of(s2, "solar", {"email": "a@b.c", "phone": "1"}, {}) != identity_of(
        S, "solar", {"email": "a@b.c", "phone": "1"}, {}
    )


def test_no_identity_without_the_fields_or_the_config() -> None:
    assert identity_of(S, "solar", {"email": "a@b.c"}, {}) is None
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    assert (
        identity_of(parse_settings(raw, env={}), "solar", {"email": "a", "phone": "1"}, {}) is None
    )


@pytest.mark.parametrize(
    "cfg, entry, lead, at, sold, verdict, skip, reason",
    [
        # first of its identity
        (REJECT, None, "a", 0, {}, "pass", [], ""),
        # a second within the window
        (
            REJECT,
            {"leads": [["a", 0]]},
            "b",
            H - 1,
            {},
            "reject",
            [],
            "duplicate of lead a (same email, phone) within 1h",
        ),
        # simultaneous: same instant, the first processed wins
        (
            REJECT,
            {"leads": [["a", 5]]},
            "b",
            5,
            {},
            "reject",
            [],
            "duplicate of lead a (same email, phone) within 1h",
        ),
        # processed later with an earlier timestamp (clock skew): still the duplicate
        (
            REJECT,
            {"leads": [["a", 5]]},
            "b",
            4,
            {},
            "reject",
            [],
            "duplicate of lead a (same email, phone) within 1h",
        ),
        # window edge: exactly window_s later is still inside, one ms later is outside
        (
            REJECT,
            {"leads": [["a", 0]]},
            "b",
            H,
            {},
            "reject",
            [],
            "duplicate of lead a (same email, phone) within 1h",
        ),
        (REJECT, {"leads": [["a", 0]]}, "b", H + 1, {}, "pass", [], ""),
        # the same lead redelivered is not its own duplicate
        (REJECT, {"leads": [["a", 0]]}, "a", 10, {}, "pass", [], ""),
        # skip_buyers: auctioned without the buyers of the earlier, settled lead
        (SKIP, {"leads": [["a", 0]]}, "b", 10, {"a": ["x", "y"]}, "pass", ["x", "y"], ""),
        (
            SKIP,
            {"leads": [["a", 0], ["b", 10]]},
            "c",
            20,
            {"a": ["x"], "b": ["y", "x"]},
            "pass",
            ["x", "y"],
            "",
        ),
        # skip_buyers while the earlier lead is still being sold: rejected, never sold twice
        (
            SKIP,
            {"leads": [["a", 0]]},
            "b",
            10,
            {},
            "reject",
            [],
            "duplicate of lead a (same email, phone), which is still being sold",
        ),
    ],
)
def test_decide(
    cfg: DuplicatesConfig,
    entry: dict[str, Any] | None,
    lead: str,
    at: int,
    sold: dict[str, list[str]],
    verdict: str,
    skip: list[str],
    reason: str,
) -> None:
    v, new, why, s = decide(entry, lead, at, cfg, sold)
    assert (v, why, s) == (verdict, reason, skip)
    ids = [x[0] for x in new["leads"]]
    assert (lead in ids) == (v == "pass")  # only auctioned leads are remembered
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "s, label", [(86400, "24h"), (3600, "1h"), (1800, "30 min"), (7 * 86400, "7d"), (90, "90 s")]
)
def test_window_label(s: float, label: str) -> None:
    assert window_label(s) == label
