"""One module per outside system: buyers over HTTP (``buyers``), ClickHouse (``clickhouse``),
alert webhooks (``webhook``), the local Kafka broker (``kafka_broker``) and the embedded
warehouse (``warehouse``). Connectors import nothing from ``streams``."""

__all__: list[str] = []
