#!/usr/bin/env bash
# clickhouse-connect's own integration suite against pingpost's embedded warehouse (issue 14):
# how far the warehouse answers like a ClickHouse server, judged by a client nobody here wrote.
# Run on purpose, not in CI (CI reaches only the package registries).
#
#   bench/clickhouse_conformance.sh CC_CHECKOUT [WORK_DIR]
#
# CC_CHECKOUT: a checkout of github.com/ClickHouse/clickhouse-connect, as close to the pinned
#   clickhouse-connect (pyproject.toml) as you can get: `git clone --branch v<version> ...`.
#   Only its tests/integration_tests are used; the client under test is the pinned release
#   from PyPI, installed in a venv of its own with the suite's test dependencies.
# WORK_DIR: where the venv, the warehouse's data and the results go (default: a temp dir).
#
# Prints pytest's summary; the expected failures (an embedded engine has no users and roles,
# no query_log, no native port) are listed in docs/warehouse-conformance.md.
set -euo pipefail
CC=${1:?usage: bench/clickhouse_conformance.sh CC_CHECKOUT [WORK_DIR]}
CC=$(cd "$CC" && pwd)
W=${2:-$(mktemp -d -t pingpost-conformance-XXXX)}
mkdir -p "$W"
W=$(cd "$W" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || { echo "no $PY: run 'make install' first" >&2; exit 2; }
[ -d "$CC/tests/integration_tests" ] || { echo "$CC has no tests/integration_tests" >&2; exit 2; }
PIN=$(grep -o 'clickhouse-connect\[async\]==[0-9.]*' "$REPO/pyproject.toml" | cut -d= -f3)

# 1. The suite's own venv: the pinned client and what the tests import.
if [ ! -x "$W/venv/bin/python" ]; then
  echo "• creating the test venv in $W/venv (clickhouse-connect==$PIN and the suite's deps)"
  python3 -m venv "$W/venv"
  "$W/venv/bin/pip" install -q "clickhouse-connect==$PIN" pytest pytest-timeout pytest-asyncio \
    pytest-mock 'pyjwt[crypto]' 'sqlalchemy>=2,<3' 'alembic>=1.18' numpy 'pandas>=2,<4' pyarrow \
    'polars>=1.0' lz4 zstandard 'aiohttp>=3.9.0' certifi urllib3 pytz
fi
# 2. Only the tests (the checkout's own clickhouse_connect/ must not shadow the pinned one),
#    with a pytest.ini of our own (upstream's runs xdist and reads .env files).
rm -rf "$W/run" && mkdir -p "$W/run" && cp -r "$CC/tests" "$W/run/"
printf '[pytest]\nasyncio_default_fixture_loop_scope = session\n' > "$W/run/pytest.ini"
# 3. A warehouse of its own, on a free port, in a fresh data dir.
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$W/wh-data"
(cd "$REPO" && exec "$PY" -m connectors.warehouse --data-dir "$W/wh-data" --port "$PORT") \
  > "$W/warehouse.log" 2>&1 &
WH=$!
trap 'kill $WH 2>/dev/null; wait $WH 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/ping" > /dev/null && break
  kill -0 $WH 2>/dev/null || { cat "$W/warehouse.log" >&2; exit 1; }
  sleep 0.5
done
echo "• warehouse on :$PORT (log $W/warehouse.log); suite from $CC ($(git -C "$CC" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
# 4. The suite.
cd "$W/run"
CLICKHOUSE_CONNECT_TEST_HOST=127.0.0.1 CLICKHOUSE_CONNECT_TEST_PORT=$PORT \
  CLICKHOUSE_CONNECT_TEST_DOCKER=False \
  "$W/venv/bin/python" -m pytest -p no:cacheprovider -q -rfEs --timeout 60 \
  --junitxml="$W/junit.xml" tests/integration_tests || true
echo "• results: $W/junit.xml"
