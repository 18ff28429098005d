// Runs the official JavaScript client (@clickhouse/client) against a ClickHouse HTTP
// endpoint (the embedded warehouse, or a real server) and prints one line per check:
//   ok   <name>
//   FAIL <name>: <reason>
// Exits 1 if any check failed. The endpoint comes from CLICKHOUSE_URL.
import { randomUUID } from 'node:crypto'
import { createClient, ClickHouseError, ClickHouseLogLevel } from '@clickhouse/client'

const url = process.env.CLICKHOUSE_URL || 'http://127.0.0.1:8123'
const CHECK_TIMEOUT_MS = 60_000
const db = `jscheck_${Date.now()}_${process.pid}`

// The expected errors below would otherwise be logged by the client at ERROR level;
// CLICKHOUSE_LOG_LEVEL=WARN (or TRACE...) shows the client's own log.
const log = { level: ClickHouseLogLevel[process.env.CLICKHOUSE_LOG_LEVEL || 'OFF'] }
const client = createClient({ url, log })
const clients = [client]
function newClient(extra) {
  const c = createClient({ url, log, ...extra })
  clients.push(c)
  return c
}

class CheckError extends Error {}
function assert(cond, message) {
  if (!cond) throw new CheckError(message)
}
function assertEqual(actual, expected, what) {
  const a = JSON.stringify(actual)
  const e = JSON.stringify(expected)
  assert(a === e, `${what}: expected ${e}, got ${a}`)
}
// count() and other UInt64 values: servers before 25.8 quote them in JSON
// (output_format_json_quote_64bit_integers=1), later ones do not; accept both.
function asNumber(v) {
  return typeof v === 'string' ? Number(v) : v
}
async function expectError(promise) {
  try {
    await promise
  } catch (err) {
    return err
  }
  throw new CheckError('expected the query to be rejected, but it succeeded')
}

const checks = []
function check(name, fn) {
  checks.push({ name, fn })
}

// --- connection

check('ping', async () => {
  const r = await client.ping()
  assert(r.success === true, `ping not successful: ${r.error?.message ?? JSON.stringify(r)}`)
})

// --- query formats

check('query JSONEachRow', async () => {
  const rs = await client.query({
    query: "SELECT number AS n, toString(number) AS s FROM system.numbers LIMIT 3",
    format: 'JSONEachRow',
  })
  const rows = await rs.json()
  assertEqual(
    rows.map((r) => [asNumber(r.n), r.s]),
    [[0, '0'], [1, '1'], [2, '2']],
    'rows',
  )
  assert(typeof rs.query_id === 'string' && rs.query_id.length > 0, 'no query_id')
})

check('query JSON', async () => {
  const rs = await client.query({
    query: "SELECT toUInt8(number) AS n, 'x' || toString(number) AS s FROM numbers(2)",
    format: 'JSON',
  })
  const doc = await rs.json()
  assertEqual(doc.meta, [{ name: 'n', type: 'UInt8' }, { name: 's', type: 'String' }], 'meta')
  assertEqual(doc.data, [{ n: 0, s: 'x0' }, { n: 1, s: 'x1' }], 'data')
  assertEqual(doc.rows, 2, 'rows')
  assert(doc.statistics && typeof doc.statistics.elapsed === 'number', 'no statistics.elapsed')
})

check('query JSONCompactEachRow', async () => {
  const rs = await client.query({
    query: "SELECT toUInt16(number) AS n, toString(number * 2) AS s FROM numbers(3)",
    format: 'JSONCompactEachRow',
  })
  assertEqual(await rs.json(), [[0, '0'], [1, '2'], [2, '4']], 'rows')
})

check('query CSV text', async () => {
  const rs = await client.query({
    query: "SELECT number AS n, concat('a,', toString(number)) AS s FROM numbers(2)",
    format: 'CSV',
  })
  assertEqual(await rs.text(), '0,"a,0"\n1,"a,1"\n', 'text')
})

check('query TabSeparated text', async () => {
  const rs = await client.query({
    query: "SELECT number AS n, concat('a\\tb', toString(number)) AS s FROM numbers(2)",
    format: 'TabSeparated',
  })
  assertEqual(await rs.text(), '0\ta\\tb0\n1\ta\\tb1\n', 'text')
})

check('query stream 100000 rows', async () => {
  const rs = await client.query({
    query: 'SELECT number FROM numbers(100000)',
    format: 'JSONEachRow',
  })
  let count = 0
  let sum = 0
  let expectedNext = 0
  for await (const rows of rs.stream()) {
    for (const row of rows) {
      const n = asNumber(row.json().number)
      assert(n === expectedNext, `row ${count}: expected ${expectedNext}, got ${n}`)
      expectedNext++
      sum += n
      count++
    }
  }
  assertEqual(count, 100000, 'row count')
  assertEqual(sum, (99999 * 100000) / 2, 'sum')
})

// --- query parameters

check('query_params UInt32 and quoted String', async () => {
  const s = `it's "quoted" \\ back\\slash, tab\there, newline\nend`
  const rs = await client.query({
    query: 'SELECT {x: UInt32} AS x, {s: String} AS s, toTypeName({x: UInt32}) AS t',
    query_params: { x: 4294967295, s },
    format: 'JSONEachRow',
  })
  assertEqual(await rs.json(), [{ x: 4294967295, s, t: 'UInt32' }], 'row')
})

// --- DDL via command()

check('command CREATE DATABASE', async () => {
  await client.command({ query: `CREATE DATABASE ${db}` })
  const rs = await client.query({
    query: 'SELECT name FROM system.databases WHERE name = {db: String}',
    query_params: { db },
    format: 'JSONEachRow',
  })
  assertEqual(await rs.json(), [{ name: db }], 'system.databases')
})

check('command CREATE TABLE MergeTree', async () => {
  await client.command({
    query: `CREATE TABLE ${db}.events (id UInt32, name String, ts DateTime) ENGINE = MergeTree ORDER BY id`,
  })
  const rs = await client.query({
    query: 'SELECT engine FROM system.tables WHERE database = {db: String} AND name = {t: String}',
    query_params: { db, t: 'events' },
    format: 'JSONEachRow',
  })
  assertEqual(await rs.json(), [{ engine: 'MergeTree' }], 'system.tables')
})

// --- inserts

check('insert 10000 rows JSONEachRow', async () => {
  const values = Array.from({ length: 10000 }, (_, i) => ({
    id: i,
    name: `name ${i} "q" 'q'`,
    ts: '2023-07-05 12:44:22',
  }))
  const r = await client.insert({ table: `${db}.events`, values, format: 'JSONEachRow' })
  assert(r.executed === true, 'insert not executed')
  const rs = await client.query({
    query: `SELECT count() AS c, sum(id) AS s, countIf(name = 'name 7 "q" \\'q\\'') AS q FROM ${db}.events`,
    format: 'JSONEachRow',
  })
  const [row] = await rs.json()
  assertEqual(asNumber(row.c), 10000, 'count()')
  assertEqual(asNumber(row.s), (9999 * 10000) / 2, 'sum(id)')
  assertEqual(asNumber(row.q), 1, 'rows with the quoted name')
})

check('insert() summary: written_rows and elapsed_ns', async () => {
  // X-ClickHouse-Summary, which insert() returns parsed: a server sends every counter as
  // a string, and elapsed_ns is the insert's own duration (so at most the call's time).
  await client.command({ query: `CREATE TABLE ${db}.summary (x UInt32) ENGINE = MergeTree ORDER BY x` })
  for (let i = 0; i < 2; i++) {
    if (i) await new Promise((r) => setTimeout(r, 1000))
    const values = Array.from({ length: 1000 }, (_, x) => ({ x }))
    const started = process.hrtime.bigint()
    const r = await client.insert({ table: `${db}.summary`, values, format: 'JSONEachRow' })
    const wallNs = process.hrtime.bigint() - started
    assert(r.summary, 'no summary')
    assertEqual(r.summary.written_rows, '1000', `insert ${i} written_rows`)
    const elapsed = BigInt(r.summary.elapsed_ns)
    assert(
      elapsed <= wallNs,
      `insert ${i}: elapsed_ns ${elapsed} (${Number(elapsed) / 1e9} s) is longer than the whole ` +
        `insert() call, ${wallNs} ns (${Number(wallNs) / 1e9} s)`,
    )
  }
})

check('compression: gzip insert and gzip response', async () => {
  const gz = newClient({ compression: { request: true, response: true } })
  await gz.command({
    query: `CREATE TABLE ${db}.gz (id UInt32, payload String) ENGINE = MergeTree ORDER BY id`,
  })
  const values = Array.from({ length: 10000 }, (_, i) => ({ id: i, payload: 'x'.repeat(50) + i }))
  await gz.insert({ table: `${db}.gz`, values, format: 'JSONEachRow' })
  const rs = await gz.query({
    query: `SELECT id, payload FROM ${db}.gz ORDER BY id`,
    format: 'JSONEachRow',
  })
  const encoding = rs.response_headers['content-encoding']
  const rows = await rs.json()
  assertEqual(encoding, 'gzip', 'response Content-Encoding')
  assertEqual(rows.length, 10000, 'rows read back')
  assertEqual(rows[9999], { id: 9999, payload: 'x'.repeat(50) + 9999 }, 'last row')
})

// --- time zones

check('DateTime/DateTime64 with time zones via JSONEachRow', async () => {
  await client.command({
    query: `CREATE TABLE ${db}.tz (dt DateTime('America/Chicago'), dt64 DateTime64(3, 'Asia/Tokyo')) ENGINE = MergeTree ORDER BY dt`,
  })
  await client.insert({
    table: `${db}.tz`,
    values: [{ dt: '2023-07-05 12:44:22', dt64: '2023-07-05 12:44:22.500' }],
    format: 'JSONEachRow',
  })
  const fromTable = await (
    await client.query({ query: `SELECT dt, dt64 FROM ${db}.tz`, format: 'JSONEachRow' })
  ).json()
  const expected = [{ dt: '2023-07-05 12:44:22', dt64: '2023-07-05 12:44:22.500' }]
  assertEqual(fromTable, expected, 'from table')
  const literal = await (
    await client.query({
      query:
        "SELECT toDateTime('2023-07-05 12:44:22', 'America/Chicago') AS dt, " +
        "toDateTime64('2023-07-05 12:44:22.5', 3, 'Asia/Tokyo') AS dt64",
      format: 'JSONEachRow',
    })
  ).json()
  assertEqual(literal, expected, 'from literals')
})

// --- sessions

check('session: temporary table across queries', async () => {
  const s = newClient({ session_id: randomUUID() })
  await s.command({ query: 'CREATE TEMPORARY TABLE tmp_js (x UInt8, s String)' })
  await s.command({ query: "INSERT INTO tmp_js VALUES (1, 'a'), (2, 'b')" })
  const rows = await (
    await s.query({ query: 'SELECT x, s FROM tmp_js ORDER BY x', format: 'JSONEachRow' })
  ).json()
  assertEqual(rows, [{ x: 1, s: 'a' }, { x: 2, s: 'b' }], 'rows')
  // and it is really session-scoped: another session does not see it
  const other = newClient({ session_id: randomUUID() })
  const err = await expectError(other.query({ query: 'SELECT * FROM tmp_js', format: 'JSONEachRow' }))
  assert(err instanceof ClickHouseError && err.code === '60', `other session: ${err}`)
})

check('session: SET then getSetting', async () => {
  const s = newClient({ session_id: randomUUID() })
  await s.command({ query: 'SET max_result_rows = 12345' })
  const [row] = await (
    await s.query({ query: "SELECT getSetting('max_result_rows') AS v", format: 'JSONEachRow' })
  ).json()
  assertEqual(asNumber(row.v), 12345, "getSetting('max_result_rows')")
})

// --- errors

check('error: syntax error is ClickHouseError code 62', async () => {
  const err = await expectError(client.query({ query: 'SELECT FROM WHERE', format: 'JSONEachRow' }))
  assert(err instanceof ClickHouseError, `not a ClickHouseError: ${err}`)
  assertEqual(err.code, '62', 'code')
  assertEqual(err.type, 'SYNTAX_ERROR', 'type')
  assert(err.message.includes('Syntax error'), `message: ${err.message}`)
})

check('error: unknown table is ClickHouseError code 60', async () => {
  const err = await expectError(
    client.query({ query: `SELECT * FROM ${db}.no_such_table_js`, format: 'JSONEachRow' }),
  )
  assert(err instanceof ClickHouseError, `not a ClickHouseError: ${err}`)
  assertEqual(err.code, '60', 'code')
  assertEqual(err.type, 'UNKNOWN_TABLE', 'type')
  assert(err.message.includes('no_such_table_js'), `message: ${err.message}`)
})

// --- settings per request

check('clickhouse_settings max_block_size applies', async () => {
  const [row] = await (
    await client.query({
      query: "SELECT getSetting('max_block_size') AS v",
      format: 'JSONEachRow',
      clickhouse_settings: { max_block_size: '4321' },
    })
  ).json()
  assertEqual(asNumber(row.v), 4321, "getSetting('max_block_size')")
  const [dflt] = await (
    await client.query({ query: "SELECT getSetting('max_block_size') AS v", format: 'JSONEachRow' })
  ).json()
  assert(asNumber(dflt.v) !== 4321, 'the setting leaked into the next query')
})

// --- exec

check('exec raw statements', async () => {
  const ins = await client.exec({ query: `INSERT INTO ${db}.events (id, name, ts) VALUES (100000, 'exec', '2023-07-05 12:44:22')` })
  ins.stream.resume()
  await new Promise((resolve, reject) => ins.stream.on('end', resolve).on('error', reject))
  const sel = await client.exec({
    query: `SELECT id, name FROM ${db}.events WHERE name = 'exec' FORMAT TabSeparated`,
  })
  let text = ''
  for await (const chunk of sel.stream) text += chunk.toString()
  assertEqual(text, '100000\texec\n', 'exec SELECT output')
  assert(typeof sel.query_id === 'string' && sel.query_id.length > 0, 'no query_id')
})

// --- cancellation

const notes = []
async function waitProcesses(queryId, want, ms, message) {
  // poll system.processes until it lists the query `want` times (0 or 1)
  const deadline = Date.now() + ms
  for (;;) {
    const [row] = await (
      await client.query({
        query: 'SELECT count() AS c FROM system.processes WHERE query_id = {id: String}',
        query_params: { id: queryId },
        format: 'JSONEachRow',
      })
    ).json()
    if (asNumber(row.c) === want) return
    assert(Date.now() < deadline, message)
    await new Promise((r) => setTimeout(r, 50))
  }
}
function waitGone(queryId, ms = 5000) {
  // the server must stop the query once the client has gone: system.processes forgets it
  return waitProcesses(queryId, 0, ms, `query ${queryId} still in system.processes ${ms} ms after the client went away`)
}
async function nextQueriesWork() {
  // the client's socket pool and the server must both be fine afterwards
  for (let i = 0; i < 5; i++) {
    const [row] = await (
      await client.query({ query: `SELECT ${i} + 1 AS v`, format: 'JSONEachRow' })
    ).json()
    assertEqual(row.v, i + 1, `query ${i} after the abort`)
  }
}

check('abort_signal before the response, then next query works', async () => {
  const controller = new AbortController()
  const query_id = randomUUID()
  const pending = client.query({
    query: 'SELECT sleepEachRow(0.5) FROM numbers(4)', // 2 s before the first block
    format: 'JSONEachRow',
    query_id,
    abort_signal: controller.signal,
  })
  setTimeout(() => controller.abort(), 300)
  const err = await expectError(pending)
  assert(/abort/i.test(`${err.name} ${err.message}`), `not an abort error: ${err}`)
  await nextQueriesWork()
  await waitGone(query_id)
})

check('abort_signal mid-stream, then next query works', async () => {
  const controller = new AbortController()
  const total = 50_000_000
  const rs = await client.query({
    query: `SELECT number FROM numbers(${total})`,
    format: 'JSONEachRow',
    abort_signal: controller.signal,
  })
  let seen = 0
  let abortedAt = -1
  let abortError = null
  try {
    for await (const rows of rs.stream()) {
      seen += rows.length
      if (abortedAt < 0 && seen >= 1000) {
        controller.abort()
        abortedAt = seen
      }
      // @clickhouse/client 1.23.1 detaches abort_signal once query() has resolved, so
      // the abort alone may not end the stream: then stop reading, as a caller must.
      if (abortedAt >= 0 && seen - abortedAt > 200_000) break
    }
  } catch (err) {
    abortError = err
  }
  assert(abortedAt >= 0, `the stream ended after ${seen} rows, before the abort`)
  assert(seen < total, `all ${seen} rows arrived`)
  if (!abortError) {
    notes.push(
      `abort_signal mid-stream: the stream went on for ${seen - abortedAt} rows after ` +
        'controller.abort() and was ended by leaving the for-await loop (client behaviour)',
    )
  }
  await nextQueriesWork()
  await waitGone(rs.query_id)
})

// --- query_id and progress headers

function waitRunning(queryId, ms = 5000) {
  // the query shows in system.processes under the id the client gave it
  return waitProcesses(queryId, 1, ms, `query ${queryId} not in system.processes after ${ms} ms`)
}

check('query_id: system.processes shows it, KILL QUERY stops it', async () => {
  const query_id = randomUUID()
  const pending = client.query({
    query: 'SELECT sleepEachRow(0.5) FROM numbers(40)', // 20 s unless killed
    format: 'JSONEachRow',
    query_id,
    clickhouse_settings: { max_block_size: '1' }, // a server sleeps at most 3 s a block
  })
  const outcome = pending.then(
    (rs) => rs.json().then(() => null, (err) => err),
    (err) => err,
  )
  const started = Date.now()
  await waitRunning(query_id)
  const rs = await client.query({
    query: 'KILL QUERY WHERE query_id = {id: String} SYNC FORMAT JSONEachRow',
    query_params: { id: query_id },
    format: 'JSONEachRow',
  })
  const killed = await rs.json()
  assertEqual(killed.map((r) => r.query_id), [query_id], 'KILL QUERY answer')
  const err = await outcome
  assert(err !== null, 'the killed query returned all its rows')
  assert(Date.now() - started < 10_000, `the killed query ran ${Date.now() - started} ms`)
  await waitGone(query_id)
})

check('send_progress_in_http_headers keeps a long query within request_timeout', async () => {
  const c = newClient({ request_timeout: 1000 })
  const rs = await c.query({
    query: 'SELECT sum(sleepEachRow(0.5)) AS s FROM numbers(4)', // 2 s, one row at the end
    format: 'JSONEachRow',
    clickhouse_settings: {
      send_progress_in_http_headers: 1,
      http_headers_progress_interval_ms: '200',
    },
  })
  const [row] = await rs.json()
  assertEqual(asNumber(row.s), 0, 'result')
  // and without progress headers the same query does time out (so the check can fail)
  const err = await expectError(
    c.query({ query: 'SELECT sum(sleepEachRow(0.5)) AS s FROM numbers(4)', format: 'JSONEachRow' }),
  )
  assert(/timeout/i.test(`${err.name} ${err.message}`), `not a timeout: ${err}`)
})

// --- cleanup (also checks DROP)

check('command DROP TABLE / DROP DATABASE', async () => {
  await client.command({ query: `DROP TABLE ${db}.gz` })
  await client.command({ query: `DROP DATABASE ${db}` })
  const rs = await client.query({
    query: 'SELECT count() AS c FROM system.databases WHERE name = {db: String}',
    query_params: { db },
    format: 'JSONEachRow',
  })
  const [row] = await rs.json()
  assertEqual(asNumber(row.c), 0, 'database still listed')
})

// --- runner

function withTimeout(promise, ms) {
  let timer
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new CheckError(`timed out after ${ms} ms`)), ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

function reason(err) {
  if (err instanceof CheckError) return err.message
  if (err instanceof ClickHouseError) return `ClickHouseError ${err.code} ${err.type}: ${err.message.trim()}`
  return `${err?.name ?? 'Error'}: ${String(err?.message ?? err).trim()}`
}

let failed = 0
console.log(`# @clickhouse/client against ${url}`)
for (const { name, fn } of checks) {
  try {
    await withTimeout(fn(), CHECK_TIMEOUT_MS)
    console.log(`ok   ${name}`)
  } catch (err) {
    failed++
    console.log(`FAIL ${name}: ${reason(err).replace(/\s+/g, ' ')}`)
  }
}
for (const note of notes) console.log(`# note: ${note}`)
await Promise.allSettled(clients.map((c) => c.close()))
console.log(`${checks.length - failed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
