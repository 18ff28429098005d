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
from functools import lru_cache
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


#: A run of digits with at most 3 separator characters between two of them.
_DIGIT_RUN: Final = re.compile(r"\d(?:" + _SEP + r"\d)*")


def _national(digits: str) -> str:
    return digits[1:] if len(digits) == 11 and digits[0] == "1" else digits


def _phone_spans(text: str, numbers: set[str]) -> list[tuple[int, int]]:
    """Where in ``text`` each number (its national digits) is written, whatever separates its
    digits; with its country code ``1`` (NANP), a ``+`` and an opening ``(`` before it. A
    number is matched whole: its digits are not part of a longer number. (No regex per
    number: compiling one with separators between every digit costs milliseconds.)"""
    spans = []
    for m in _DIGIT_RUN.finditer(text):
        pos = [m.start() + i for i, ch in enumerate(m.group()) if ch.isdigit()]
        ds = "".join(text[i] for i in pos)

        def apart(i: int, pos: list[int] = pos) -> bool:  # digits i-1 and i are separated
            return i == 0 or i == len(pos) or pos[i] - pos[i - 1] > 1

        for nat in numbers:
            start = ds.find(nat)
            while start != -1:
                end = start + len(nat)
                cc = len(nat) == 10 and start >= 1 and ds[start - 1] == "1" and apart(start - 1)
                if (apart(start) or cc) and apart(end):
                    lo = pos[start - 1] if cc else pos[start]
                    while lo > 0 and text[lo - 1] in "+(":
                        lo -= 1
                    spans.append((lo, pos[end - 1] + 1))
                start = ds.find(nat, start + 1)
    return spans


#: (weight, regex, anchor, is_number): the weight is the length of the text the regex stands
#: for (longer forms are tried first: a whole address before its words); every match contains
#: the anchor (lower-cased), so a text without it skips the regex — compiling one costs
#: milliseconds, matching microseconds. A number (is_number; no regex) is found by its
#: national digits in the text's digit runs.
_Pattern = tuple[int, str, str, bool]


def _first_word(text: str) -> str:
    return next((w for w in _WORD_SPLIT.split(text) if w), "").lower()


def _patterns(value: Any) -> list[_Pattern]:
    """The patterns of one PII value."""
    if value is None or isinstance(value, bool):
        return []
    s = str(value).strip()
    if len(s) < 2:
        return []
    out: list[_Pattern] = []
    digits = re.sub(r"\D", "", s)
    national = _national(digits)
    if _PHONE_LIKE.fullmatch(s) and _MIN_DIGITS <= len(digits) <= _MAX_DIGITS:
        return [(len(s), "", national, True)]
    if "@" in s and not any(c.isspace() for c in s):
        local, _, domain = s.rpartition("@")
        out.append(
            (len(s), re.escape(local) + "(?:@|%40)" + re.escape(domain), local.lower(), False)
        )
        if len(local) >= 4:
            p = _phrase(local)
            if p:
                out.append((len(local), p, _first_word(local), False))
        return out
    whole = _phrase(s)
    if whole:
        out.append((len(s), whole, _first_word(s), False))
    parts = [p.strip() for p in _PART_SPLIT.split(s)]
    if len(parts) > 1:
        for part in parts:
            if len(part) >= _MIN_WORD and (p := _phrase(part)):
                out.append((len(part), p, _first_word(part), False))
    words = [w for w in _WORD_SPLIT.split(s) if w]
    if len(words) > 1:
        for w in words:
            if len(w) >= _MIN_WORD and any(c.isalpha() for c in w):
                out.append((len(w), _bounded(re.escape(w)), w.lower(), False))
    if len(digits) >= _MIN_DIGITS:  # a long number inside text (a card, an account id)
        out.append((len(digits), "", national, True))
    return out


@lru_cache(maxsize=256)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


def _compile(values: Iterable[Any], text: str) -> tuple[re.Pattern[str] | None, set[str]]:
    """One regex of the patterns whose anchor ``text`` holds (None: no such value), and the
    numbers whose digits it holds."""
    low = text.lower()
    digits = re.sub(r"\D", "", text)
    seen: set[str] = set()
    numbers: set[str] = set()
    weighted: list[tuple[int, str]] = []
    for v in values:
        for w, p, anchor, is_number in _patterns(v):
            if is_number:
                if anchor in digits:
                    numbers.add(anchor)
            elif p not in seen and anchor in low:
                seen.add(p)
                weighted.append((w, p))
    if not weighted:
        return None, numbers
    weighted.sort(key=lambda wp: -wp[0])
    return _compiled(tuple(p for _, p in weighted)), numbers


def scrub(text: str, values: Mapping[str, Any] | Iterable[Any]) -> str:
    """``text`` with every occurrence of every value in ``values`` (a lead's PII fields, or
    just the values) replaced by ``[redacted]``."""
    if not text:
        return text
    if text.endswith("…"):
        text = _CLIPPED_TAIL.sub("…", text)
    vals = values.values() if isinstance(values, Mapping) else values
    pattern, numbers = _compile(vals, text)
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    if numbers:
        merged: list[list[int]] = []
        for lo, hi in sorted(_phone_spans(text, numbers)):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in reversed(merged):
            text = text[:lo] + REDACTED + text[hi:]
    return text


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
