"""The scrubber of buyer free text (streams/rules/scrub.py): every PII value, every common form."""

from __future__ import annotations

import hashlib

import pytest

from streams.rules.scrub import REDACTED, looks_like_contact, safe_ref, scrub

PII = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "Ada.Lovelace@Example.com",
    "phone": "+15558000237",
    "address": "1 Main St, Beverly Hills",
}
R = REDACTED


@pytest.mark.parametrize(
    "text,expected",
    [
        # phones: by their digits, whatever the formatting, with or without country code
        ("dup 15558000237", f"dup {R}"),
        ("dup +15558000237", f"dup {R}"),
        ("dup 5558000237.", f"dup {R}."),
        ("call (555) 800-0237 now", f"call {R} now"),
        ("call +1 555-800-0237", f"call {R}"),
        ("call +1 (555) 800-0237", f"call {R}"),
        ("call 1-555-800-0237", f"call {R}"),
        ("call 555.800.0237 or 555 800 0237", f"call {R} or {R}"),
        ("tel:+1\u2011555\u2013800\u20130237", f"tel:{R}"),
        # a longer number holding the phone's digits is not that phone (and no partial match)
        ("order 55580002370 ok", "order 55580002370 ok"),
        ("http 422", "http 422"),
        # emails: case-insensitively, URL-encoded, the local part alone
        ("duplicate: ada.lovelace@example.com", f"duplicate: {R}"),
        ("DUPLICATE: ADA.LOVELACE@EXAMPLE.COM!", f"DUPLICATE: {R}!"),
        ("q=ada.lovelace%40example.com", f"q={R}"),
        ("user ada.lovelace exists", f"user {R} exists"),
        # names: case-insensitive, word-bounded, every occurrence
        ("Ada Lovelace already bought", f"{R} already bought"),
        ("ada, ADA and Ada", f"{R}, {R} and {R}"),
        ("LOVELACE", R),
        ("canada and adage stay", "canada and adage stay"),
        # address: the whole value, its parts, its words of 3+ letters
        ("addr 1 Main St, Beverly Hills", f"addr {R}"),
        ("at 1 main st.", f"at {R}."),
        ("city BEVERLY HILLS", f"city {R}"),
        ("lives in Beverly", f"lives in {R}"),
        # repeated values, several values in one text
        ("15558000237 / 15558000237 / ada", f"{R} / {R} / {R}"),
        (
            "Ada Lovelace (555) 800-0237 ada.lovelace@example.com 1 Main St, Beverly Hills",
            f"{R} {R} {R} {R}",
        ),
        # clipped text: the cut-off last word goes (a half phone would not match any more)
        ("rejected: call (555) 800-02…", "rejected: call (555) …"),
        ("rejected: dup of ada.lovel…", "rejected: dup of …"),
        # nothing to do
        ("", ""),
        ("no lead data here", "no lead data here"),
    ],
)
def test_scrub_removes_every_form_of_every_value(text: str, expected: str) -> None:
    assert scrub(text, PII) == expected


@pytest.mark.parametrize(
    "values,text,expected",
    [
        ({"dob": "1990-01-02"}, "born 19900102 / 1990 01 02", f"born {R} / {R}"),
        ({"ssn": "123-45-6789"}, "ssn 123456789", f"ssn {R}"),
        ({"phone": "+442071838750"}, "ring +44 20 7183 8750", f"ring {R}"),
        ({"zip": 90210}, "zip 90210 and 902100", f"zip {R} and 902100"),
        (
            {"phone": "5558000237", "account": "acct 80002371234"},
            "5558000237 1234 / 80002371234",
            f"{R} 1234 / {R}",
        ),
        ({"name": "José Núñez"}, "JOSÉ NÚÑEZ and núñez", f"{R} and {R}"),
        ({"name": "O'Brien"}, "o brien / O'BRIEN", f"{R} / {R}"),
        ({"first_name": "Li"}, "Li said no; lint ok", f"{R} said no; lint ok"),
        ({"x": None, "y": True, "z": "a"}, "a True None", "a True None"),
        (["ada@example.com", "ada@example.com"], "ada@example.com", R),
    ],
)
def test_scrub_other_pii_fields(values: object, text: str, expected: str) -> None:
    assert scrub(text, values) == expected  # type: ignore[arg-type]


def test_scrub_never_leaves_a_value_in_generated_texts() -> None:
    """Every form, at every position, next to punctuation: none survives."""
    forms = [
        "15558000237",
        "(555) 800-0237",
        "+1 555-800-0237",
        "555-800-0237",
        "ADA.LOVELACE@EXAMPLE.COM",
        "Ada",
        "LOVELACE",
        "1 Main St",
        "Beverly Hills",
    ]
    for i, form in enumerate(forms):
        for pre, post in [("", ""), ("x ", " y"), ("(", ")"), ('"', '",'), ("dup:", ".")]:
            out = scrub(f"{pre}{form}{post} and {form}", PII)
            low = out.lower()
            assert "8000237" not in "".join(c for c in low if c.isdigit()), (i, out)
            for needle in ("ada", "lovelace", "main st", "beverly", "0237"):
                assert needle not in low.replace(R, ""), (form, out)


def test_looks_like_contact() -> None:
    assert looks_like_contact("a@b.co") and looks_like_contact("(555) 800-0237")
    assert not looks_like_contact("buyer_123") and not looks_like_contact("http 500")


def _is_pii(token: str) -> bool:
    # stands in for the keyed-hash check against the lead's PII hashes
    digest = hashlib.sha256(token.lower().encode()).hexdigest()
    return digest in {hashlib.sha256(v.encode()).hexdigest() for v in ("ada", "lovelace")}


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("buyer_123", "buyer_123"),
        ("acme-solar.eu:7", "acme-solar.eu:7"),
        (None, None),
        ("ada@example.com", None),
        ("15558000237", None),
        ("(555) 800-0237", None),
        ("1 Main St", None),
        ("Ada", None),
        ("ada_lovelace", None),
        ("x" * 129, None),
    ],
)
def test_safe_ref(ref: str | None, expected: str | None) -> None:
    assert safe_ref(ref, _is_pii) == expected
