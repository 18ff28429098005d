"""pingpost configuration: one YAML file, validated at start-up.

The file is read once at the edge (CLI), ``${VAR}`` / ``${VAR:-default}`` references are
resolved from the environment, and the result is a frozen, typed :class:`Settings`. Every
validation error names the key path (``buyers[2].ping_url``) and the problem, so an operator
can fix the file without reading code. Secrets (buyer headers, producer tokens, the ClickHouse
password) are ``SecretStr``: they never print, and never reach logs, topics or ClickHouse.

The model is split by concern: ``base`` (the model base, ``ConfigError``), ``infra`` (Kafka,
ClickHouse, ingest, workers, privacy), ``market`` (flows and buyers), ``metrics`` (metrics and
alert rules), ``simulator`` (the simulated buyers) and ``loader`` (``Settings``, parsing and
loading); every public name is re-exported here: ``from streams.settings import FlowConfig``.
"""

from streams.settings import base, infra, loader, market, metrics, simulator, version
from streams.settings.base import *  # noqa: F403
from streams.settings.infra import *  # noqa: F403
from streams.settings.loader import *  # noqa: F403
from streams.settings.market import *  # noqa: F403
from streams.settings.metrics import *  # noqa: F403
from streams.settings.simulator import *  # noqa: F403
from streams.settings.version import *  # noqa: F403

__all__ = [
    *base.__all__,
    *infra.__all__,
    *market.__all__,
    *metrics.__all__,
    *simulator.__all__,
    *loader.__all__,
    *version.__all__,
]
