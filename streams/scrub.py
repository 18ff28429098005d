"""Scrub PII out of untrusted free text: buyers' reasons and anything else a buyer returns.

Pure functions, no I/O. :func:`scrub` replaces every occurrence of every PII value of a lead,
in the forms people write them, by ``[redacted]``:

* an email: case-insensitively, ``@`` also URL-encoded (``%40``); its local part alone too;
* a phone number (or any value of 7-15 digits written with digits, spaces, ``+ ( ) - . /``
  only — a date of birth, an SSN): by its digits, whatever separators sit between them, with
  or without the country code (``15558000237``, ``(555) 800-0237``, ``+1 555-800-0237``);
* any other text (names, addresses, ...): the whole value, each of its comma-separated parts
  (``1 Main St``, ``Beverly Hills``) and each word of 3+ characters holding a letter;
  case-insensitively, word-bounded, any whitespace or punctuation between the words.

Text clipped with ``…`` loses its last, cut-off word first: a value cut in half would no
longer match (``(555) 800-02…``).

Over-redaction (a buyer's word that happens to equal the lead's street name) is the accepted
price: the reason stays readable, the PII never lands in a topic, a table or a log.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

__all__ = ["REDACTED", "looks_like_contact", "safe_ref", "scrub"]

REDACTED: Final = "[redacted]"

#: What may sit between two digits of a phone number ("(555) 800-0237", "555.800.0237").
_SEP: Final = r"[\s().\-/\u2010-\u2015]{0,3}"
_PHONE_LIKE: Final = re.compile(r"[\s\d().+\-/\u2010-\u2015]+")
_WORD_SPLIT: Final = re.compile(r"[\W_]+")
_PART_SPLIT: Final = re.compile(r"[,;\n]+")
_CLIPPED_TAIL: Final = re.compile(r"\S*…$")
#: Generic shapes, for text whose lead is unknown: an email, a run of 7+ phone digits.
_ANY_EMAIL: Final = re.compile(r"[^\s@]+(?:@|%40)[^\s@]+\.[^\s@]+", re.IGNORECASE)
_ANY_PHONE: Final = re.compile(r"\+?\d(?:" + _SEP + r"\d){6,}")
#: A buyer-supplied id kept as is: one token of id characters.
_REF_SHAPE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

_MIN_DIGITS, _MAX_DIGITS = 7, 15
_MIN_WORD = 3


def _bounded(body: str) -> str:
    return rf"(?<!\w)(?:{body})(?!\w)"


def _phrase(text: str) -> str | None:
    """``text`` as word-bounded words with any non-word run between them."""
    words = [w for w in _WORD_SPLIT.split(text) if w]
    if not words:
        return None
    return _bounded(r"[\W_]+".join(re.escape(w) for w in words))


def _phone(digits: str) -> str:
    national = digits[1:] if len(digits) == 11 and digits[0] == "1" else digits
    body = _SEP.join(national)
    if len(national) == 10:  # NANP: the country code is optional
        return rf"(?<!\d)(?:(?:\+\s*)?1{_SEP})?\(?{body}(?!\d)"
    return rf"(?<!\d)\+?{body}(?!\d)"


def _patterns(value: Any) -> list[tuple[int, str]]:
    """(weight, regex) for one PII value: the weight is the length of the text it stands
    for, and longer forms are tried first (a whole address before its words)."""
    if value is None or isinstance(value, bool):
        return []
    s = str(value).strip()
    if len(s) < 2:
        return []
    out: list[tuple[int, str]] = []
    digits = re.sub(r"\D", "", s)
    if _PHONE_LIKE.fullmatch(s) and _MIN_DIGITS <= len(digits) <= _MAX_DIGITS:
        return [(len(s), _phone(digits))]
    if "@" in s and not any(c.isspace() for c in s):
        local, _, domain = s.rpartition("@")
        out.append((len(s), re.escape(local) + "(?:@|%40)" + re.escape(domain)))
        if len(local) >= 4:
            p = _phrase(local)
            if p:
                out.append((len(local), p))
        return out
    whole = _phrase(s)
    if whole:
        out.append((len(s), whole))
    parts = [p.strip() for p in _PART_SPLIT.split(s)]
    if len(parts) > 1:
        for part in parts:
            if len(part) >= _MIN_WORD and (p := _phrase(part)):
                out.append((len(part), p))
    words = [w for w in _WORD_SPLIT.split(s) if w]
    if len(words) > 1:
        for w in words:
            if len(w) >= _MIN_WORD and any(c.isalpha() for c in w):
                out.append((len(w), _bounded(re.escape(w))))
    if len(digits) >= _MIN_DIGITS:  # a long number inside text (a card, an account id)
        out.append((len(digits), _phone(digits)))
    return out


def _compile(values: Iterable[Any]) -> re.Pattern[str] | None:
    seen: set[str] = set()
    weighted: list[tuple[int, str]] = []
    for v in values:
        for w, p in _patterns(v):
            if p not in seen:
                seen.add(p)
                weighted.append((w, p))
    if not weighted:
        return None
    weighted.sort(key=lambda wp: -wp[0])
    return re.compile("|".join(f"(?:{p})" for _, p in weighted), re.IGNORECASE)


def scrub(text: str, values: Mapping[str, Any] | Iterable[Any]) -> str:
    """``text`` with every occurrence of every value in ``values`` (a lead's PII fields, or
    just the values) replaced by ``[redacted]``."""
    if not text:
        return text
    if text.endswith("…"):
        text = _CLIPPED_TAIL.sub("…", text)
    vals = values.values() if isinstance(values, Mapping) else values
    pattern = _compile(vals)
    return text if pattern is None else pattern.sub(REDACTED, text)


def looks_like_contact(text: str) -> bool:
    """Whether ``text`` holds something shaped like an email or a phone number."""
    return bool(_ANY_EMAIL.search(text) or _ANY_PHONE.search(text))


def safe_ref(ref: str | None, is_pii: Callable[[str], bool] | None = None) -> str | None:
    """A buyer-supplied identifier (a ping answer's ``buyer_id``) kept only when it cannot
    carry PII: one token of id characters (no ``@``, no spaces), no run of phone digits, and
    neither it nor any of its ``_ . : -`` pieces a PII value (``is_pii``: e.g. a keyed-hash
    match against the lead's PII hashes). Otherwise None: the id is informational."""
    if ref is None or not _REF_SHAPE.fullmatch(ref) or looks_like_contact(ref):
        return None
    if is_pii is not None:
        pieces = {ref, *(p for p in re.split(r"[_.:-]+", ref) if len(p) >= 2)}
        if any(is_pii(p) for p in pieces):
            return None
    return ref
