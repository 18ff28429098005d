"""Pure decisions: no I/O, no clock, no Faust, no Kafka or HTTP client, no connector.

Every function here takes what it needs (the time included) and returns a decision, so each
is table-tested on its own (tests/unit) and the stages only wire them in. An import contract
(tests/test_architecture.py) keeps it so.

- ``selling``: eligibility, floors, scoring, ranking, modes, waves, auto-pause (re-exported
  here: ``from streams import rules; rules.eligibility(...)``)
- ``auction``: which bids may win and how a lead is sold
- ``pinging`` / ``posting``: ping plans and ids; the post waterfall's next batch and bodies
- ``leads``: validation and redaction of a lead; ``scrub``: PII out of buyer text
- ``dedupe``, ``caps``, ``buyer_stats``: the duplicate decision, the cap ledger, acceptance
  and auto-pause bookkeeping
- ``windows``, ``alerts``: the metrics' windows and the alert state machine
- ``admission``: the queue-delay estimate behind ingest's 429s
- ``privacy``: what a dead letter may keep
"""

from streams.rules.selling import *  # noqa: F403 - the selling rules, at the package level
from streams.rules.selling import __all__ as __all__
