"""The stages of the pipeline, one floor: each registers its agents on a worker's app through
``register(ctx)`` and none imports another (``streams.context`` carries what they share)."""

__all__: list[str] = []
