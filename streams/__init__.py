"""pingpost's stream processor. Reading order for a newcomer:

1. ``topics``: every topic, what flows on it, who writes and who reads it.
2. ``app``: ``create_app(settings, role)`` wires the stages of a worker role.
3. ``stages``: one module per stage (ingest, redact, dedupe, ping, auction, post, caps,
   buyer_feeds, sink, metrics); none imports another, they share ``context.Context``.
4. ``rules``: the pure decisions the stages apply (table-tested in tests/unit).
5. ``runtime``: Faust plumbing that knows no stage (acks, feeds, fan-out, Faust patches,
   watchdog, liveness); ``settings``: the configuration model; ``tools``: CLI, local stack,
   demo, simulator, reports.

``tests/test_architecture.py`` keeps these layers (pyproject ``[tool.importlinter]``).
"""

__all__: list[str] = []
