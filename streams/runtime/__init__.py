"""Faust plumbing that knows no stage: the per-event failure policy (``agents``), group-less
feeds (``feeds``), the one-buyer ping (``fanout``), the admission progress reports
(``progress``), the Faust patches (``faust_patches``) and the partition watchdog
(``watchdog``), the stuck-client monitor (``liveness``) and quiet Kafka logs (``quiet``)."""

__all__: list[str] = []
