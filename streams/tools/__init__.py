"""The edges, not the pipeline: the ``pingpost`` CLI, the local stack and its supervisor, the
demo, the buyer simulator and the reports."""

__all__: list[str] = []
