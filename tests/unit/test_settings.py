"""streams.settings: parse_settings / load_settings — key paths in errors, ${VAR}, secrets."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from streams.settings import ConfigError, Settings, load_settings, parse_settings

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "config" / "demo.yaml"

Mutator = Callable[[dict[str, Any]], None]


def minimal() -> dict[str, Any]:
    """The smallest useful configuration: one flow, two buyers."""
    return {
        "flows": {
            "solar": {
                "fields": {
                    "state": {"type": "string", "pattern": "^[A-Z]{2}$"},
                    "zip": {"type": "string"},
                    "homeowner": {"type": "boolean"},
                    "email": {"type": "string"},
                    "phone": {"type": "string"},
                },
                "required": ["state", "email"],
                "ping_fields": {"state": {}, "zip": {"transform": "zip3"}, "homeowner": {}},
                "pii_fields": ["email", "phone"],
            }
        },
        "buyers": [
            {
                "id": "alpha",
                "flows": ["solar"],
                "ping_url": "http://a.test/ping",
                "post_url": "http://a.test/post",
            },
            {
                "id": "beta",
                "flows": ["solar"],
                "ping_url": "https://b.test/ping",
                "post_url": "https://b.test/post",
            },
        ],
    }


def parse(raw: Any, env: dict[str, str] | None = None) -> Settings:
    return parse_settings(raw, env={} if env is None else env)


def config_error(raw: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, env)
    return str(info.value)


# --------------------------------------------------------------------------- valid input


def test_minimal_config_parses_with_documented_defaults() -> None:
    s = parse(minimal())
    assert isinstance(s, Settings)
    assert list(s.flows) == ["solar"]
    flow = s.flows["solar"]
    assert flow.ping_fields["zip"].transform == "zip3"
    assert flow.ping_fields["state"].transform == "keep"
    assert flow.pii_fields == ["email", "phone"]
    assert flow.strategy.shared_max == 3
    assert flow.strategy.mode == "highest"
    assert flow.deadline_ms == 750
    assert flow.safety_margin_ms < flow.deadline_ms
    assert [b.id for b in s.buyers] == ["alpha", "beta"]
    assert s.buyers[0].timeout_ms == 500
    assert s.kafka.topic_prefix == "pingpost"
    assert s.clickhouse.database == "pingpost"


def test_settings_helpers() -> None:
    raw = minimal()
    raw["flows"]["roof"] = copy.deepcopy(raw["flows"]["solar"])
    raw["buyers"].append(
        {
            "id": "gamma",
            "flows": ["roof"],
            "ping_url": "http://g.test/p",
            "post_url": "http://g.test/q",
        }
    )
    s = parse(raw)
    assert [b.id for b in s.buyers_for("solar")] == ["alpha", "beta"]
    assert [b.id for b in s.buyers_for("roof")] == ["gamma"]
    assert s.buyers_for("nope") == []
    assert s.buyer("beta").ping_url == "https://b.test/ping"
    with pytest.raises(KeyError):
        s.buyer("nobody")


def test_settings_are_frozen() -> None:
    s = parse(minimal())
    with pytest.raises(ValidationError):
        s.buyers[0].id = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


def _set(path: list[Any], value: Any) -> Mutator:
    def mut(d: dict[str, Any]) -> None:
        node: Any = d
        for p in path[:-1]:
            if isinstance(node, dict):
                node = node.setdefault(p, {})
            else:
                node = node[p]
        node[path[-1]] = value

    return mut


def _del(path: list[Any]) -> Mutator:
    def mut(d: dict[str, Any]) -> None:
        node: Any = d
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]

    return mut


def _dup_buyer(d: dict[str, Any]) -> None:
    d["buyers"][1]["id"] = d["buyers"][0]["id"]


def _flow(**kw: Any) -> Mutator:
    def mut(d: dict[str, Any]) -> None:
        d["flows"]["solar"].update(kw)

    return mut


def _add_ping_field(name: str, spec: dict[str, Any] | None = None) -> Mutator:
    def mut(d: dict[str, Any]) -> None:
        d["flows"]["solar"]["ping_fields"][name] = spec or {}

    return mut


ERRORS: list[tuple[str, Mutator, list[str]]] = [
    (
        "bad ping url",
        _set(["buyers", 1, "ping_url"], "ftp://b.test/ping"),
        ["buyers[1].ping_url", "http"],
    ),
    ("ping url without host", _set(["buyers", 0, "ping_url"], "http://"), ["buyers[0].ping_url"]),
    ("missing post url", _del(["buyers", 0, "post_url"]), ["buyers[0].post_url", "required"]),
    ("bad buyer id", _set(["buyers", 0, "id"], "bad id!"), ["buyers[0].id"]),
    ("buyer timeout too small", _set(["buyers", 1, "timeout_ms"], 1), ["buyers[1].timeout_ms"]),
    (
        "unknown buyer key",
        _set(["buyers", 1, "pingurl"], "http://x/p"),
        ["buyers[1].pingurl", "not permitted"],
    ),
    ("duplicate buyer id", _dup_buyer, ["buyers[1].id", "duplicate", "alpha"]),
    (
        "buyer with unknown flow",
        _set(["buyers", 0, "flows"], ["solar", "roofing"]),
        ["buyers[0].flows", "roofing"],
    ),
    ("unknown top-level key", _set(["kafak"], {"bootstrap": "x:1"}), ["kafak", "not permitted"]),
    ("unknown nested key", _set(["kafka", "bootstrp"], "x:1"), ["kafka.bootstrp"]),
    ("flows missing", _del(["flows"]), ["flows", "required"]),
    ("ping_fields not a mapping", _flow(ping_fields=["state"]), ["flows.solar.ping_fields"]),
    (
        "bad transform",
        _add_ping_field("zip", {"transform": "rot13"}),
        ["flows.solar.ping_fields.zip.transform"],
    ),
    (
        "prefix without length",
        _add_ping_field("zip", {"transform": "prefix"}),
        ["flows.solar.ping_fields.zip", "length"],
    ),
    (
        "pii_fields missing",
        _del(["flows", "solar", "pii_fields"]),
        ["flows.solar.pii_fields", "required"],
    ),
    ("ping field that is also PII", _add_ping_field("email"), ["flows.solar", "email", "PII"]),
    ("ping field not declared", _add_ping_field("roof_age"), ["flows.solar", "roof_age"]),
    (
        "required field not declared",
        _flow(required=["state", "income"]),
        ["flows.solar", "required", "income"],
    ),
    ("PII field not declared", _flow(pii_fields=["email", "ssn"]), ["flows.solar", "ssn"]),
    (
        "reserved field name",
        _set(["flows", "solar", "fields", "price"], {}),
        ["flows.solar", "price", "reserved"],
    ),
    (
        "safety margin == deadline",
        _flow(deadline_ms=100, safety_margin_ms=100),
        ["flows.solar", "safety_margin_ms"],
    ),
    (
        "safety margin > deadline",
        _flow(deadline_ms=100, safety_margin_ms=400),
        ["flows.solar", "safety_margin_ms"],
    ),
    (
        "deadline below minimum",
        _flow(deadline_ms=10, safety_margin_ms=0),
        ["flows.solar.deadline_ms"],
    ),
    (
        "bad regex pattern",
        _set(["flows", "solar", "fields", "zip", "pattern"], "([0-9]"),
        ["flows.solar.fields.zip.pattern", "regular expression"],
    ),
    (
        "unknown field type",
        _set(["flows", "solar", "fields", "zip", "type"], "date"),
        ["flows.solar.fields.zip.type"],
    ),
    ("shared_max zero", _flow(strategy={"shared_max": 0}), ["flows.solar.strategy.shared_max"]),
    ("partitions zero", _set(["kafka", "partitions"], 0), ["kafka.partitions"]),
    (
        "leads retention under an hour",
        _set(["privacy", "leads_retention_hours"], 0.5),
        ["privacy.leads_retention_hours"],
    ),
    ("bad topic prefix", _set(["kafka", "topic_prefix"], "ping post!"), ["kafka.topic_prefix"]),
    ("bad database name", _set(["clickhouse", "database"], "ping-post"), ["clickhouse.database"]),
    ("listen not host:port", _set(["ingest", "listen"], "8080"), ["ingest.listen", "host:port"]),
    (
        "short producer token",
        _set(["ingest", "producers"], [{"name": "p", "token": "short"}]),
        ["ingest.producers[0].token", "8"],
    ),
    (
        "simulated buyer that does not exist",
        _set(["simulator", "buyers"], {"ghost": {"port": 0}}),
        ["simulator.buyers.ghost"],
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [(m, e) for _, m, e in ERRORS], ids=[n for n, _, _ in ERRORS]
)
def test_error_names_key_path_and_problem(mutate: Mutator, expected: list[str]) -> None:
    raw = minimal()
    parse(raw)  # the base is valid, so the mutation alone causes the error
    mutate(raw)
    msg = config_error(raw)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_every_bad_key_is_named_at_once() -> None:
    raw = minimal()
    raw["buyers"][1]["ping_url"] = "nope"
    raw["kafka"] = {"partitions": 0}
    msg = config_error(raw)
    assert "buyers[1].ping_url" in msg
    assert "kafka.partitions" in msg


@pytest.mark.parametrize("raw", [None, [], ["flows"], "flows: {}", 42])
def test_top_level_must_be_a_mapping(raw: Any) -> None:
    assert "(top level)" in config_error(raw)


# ---- configuration gaps found while writing these tests ------------------------------------


@pytest.mark.parametrize("rename", ["ping_id", "tmax_ms", "price", "email", "zip"])
def test_ping_field_rename_collisions_are_rejected(rename: str) -> None:
    raw = minimal()
    raw["flows"]["solar"]["ping_fields"]["state"] = {"rename": rename}
    msg = config_error(raw)
    assert "flows.solar" in msg and rename in msg


def test_min_price_above_max_price_is_rejected() -> None:
    raw = minimal()
    raw["flows"]["solar"]["strategy"] = {"min_price": 100, "max_price": 50}
    assert "flows.solar.strategy" in config_error(raw)


# --------------------------------------------------------------------------- ${VAR}


def _with_header(value: str) -> dict[str, Any]:
    raw = minimal()
    raw["buyers"][0]["headers"] = {"X-Api-Key": value}
    return raw


def test_missing_env_var_names_key_and_variable() -> None:
    msg = config_error(_with_header("${BUYER_ALPHA_KEY}"), env={"OTHER": "x"})
    assert "buyers[0].headers.X-Api-Key" in msg
    assert "BUYER_ALPHA_KEY" in msg


def test_missing_env_var_in_list_names_index() -> None:
    raw = minimal()
    raw["ingest"] = {"producers": [{"name": "p", "token": "${PRODUCER_TOKEN}"}]}
    msg = config_error(raw)
    assert "ingest.producers[0].token" in msg and "PRODUCER_TOKEN" in msg


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${KEY}", {"KEY": "from-env"}, "from-env"),
        ("${KEY:-fallback}", {}, "fallback"),
        ("${KEY:-fallback}", {"KEY": "from-env"}, "from-env"),
        ("${KEY:-}", {}, ""),
        ("Bearer ${KEY}", {"KEY": "abc"}, "Bearer abc"),
        ("${A}-${B:-b}", {"A": "a"}, "a-b"),
        ("no reference", {"KEY": "x"}, "no reference"),
    ],
)
def test_env_interpolation(value: str, env: dict[str, str], expected: str) -> None:
    s = parse(_with_header(value), env)
    assert s.buyers[0].headers["X-Api-Key"].get_secret_value() == expected


def test_env_default_is_typed_by_the_model() -> None:
    raw = minimal()
    raw["kafka"] = {"partitions": "${PARTS:-12}", "bootstrap": "${BOOT:-h:1}"}
    s = parse(raw)
    assert s.kafka.partitions == 12
    assert s.kafka.bootstrap == "h:1"
    assert parse(raw, {"PARTS": "3", "BOOT": "k:9"}).kafka.partitions == 3


def test_env_none_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINGPOST_TEST_ALPHA_KEY", "env-value-123")
    s = parse_settings(_with_header("${PINGPOST_TEST_ALPHA_KEY}"))
    assert s.buyers[0].headers["X-Api-Key"].get_secret_value() == "env-value-123"
    monkeypatch.delenv("PINGPOST_TEST_ALPHA_KEY")
    with pytest.raises(ConfigError, match="PINGPOST_TEST_ALPHA_KEY"):
        parse_settings(_with_header("${PINGPOST_TEST_ALPHA_KEY}"))


# --------------------------------------------------------------------------- secrets

SECRETS = {
    "header": "hdr-SECRET-1111",
    "token": "tok-SECRET-2222",
    "password": "pw-SECRET-3333",
    "hash_key": "hk-SECRET-4444",
}


def secret_config() -> dict[str, Any]:
    raw = minimal()
    raw["buyers"][0]["headers"] = {"X-Api-Key": SECRETS["header"]}
    raw["ingest"] = {"producers": [{"name": "web", "token": SECRETS["token"]}]}
    raw["clickhouse"] = {"password": SECRETS["password"]}
    raw["privacy"] = {"hash_key": SECRETS["hash_key"]}
    return raw


def test_secrets_are_usable() -> None:
    s = parse(secret_config())
    assert s.buyers[0].headers["X-Api-Key"].get_secret_value() == SECRETS["header"]
    assert s.ingest.producers[0].token.get_secret_value() == SECRETS["token"]
    assert s.clickhouse.password.get_secret_value() == SECRETS["password"]
    assert s.privacy.hash_key.get_secret_value() == SECRETS["hash_key"]


@pytest.mark.parametrize(
    "render",
    [
        repr,
        str,
        lambda s: repr(s.buyers[0]),
        lambda s: str(s.buyers[0].headers),
        lambda s: repr(s.ingest),
        lambda s: repr(s.clickhouse),
        lambda s: str(s.model_dump()),
        lambda s: s.model_dump_json(),
        lambda s: f"{s}",
    ],
    ids=["repr", "str", "buyer", "headers", "ingest", "clickhouse", "dump", "json", "fstring"],
)
def test_secrets_never_print(render: Callable[[Settings], str]) -> None:
    text = render(parse(secret_config()))
    for secret in SECRETS.values():
        assert secret not in text


def test_secrets_from_env_never_print() -> None:
    s = parse(_with_header("${KEY}"), {"KEY": "env-SECRET-5555"})
    assert "env-SECRET-5555" not in repr(s) and "env-SECRET-5555" not in str(s)


def test_config_errors_do_not_echo_secrets() -> None:
    raw = secret_config()
    raw["buyers"][0]["ping_url"] = "not a url"
    raw["buyers"][0]["headers"]["X-Other"] = 12345  # wrong type next to a secret
    msg = config_error(raw)
    assert "buyers[0].ping_url" in msg
    for secret in SECRETS.values():
        assert secret not in msg


def test_invalid_secret_is_not_echoed() -> None:
    raw = minimal()
    raw["ingest"] = {"producers": [{"name": "p", "token": "s3cr!"}]}
    msg = config_error(raw)
    assert "ingest.producers[0].token" in msg
    assert "s3cr!" not in msg


# --------------------------------------------------------------------------- load_settings


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "cannot read" in msg


def test_load_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("flows: {solar: [unclosed\n  - : :\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "YAML" in msg


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_load_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path)


def test_load_invalid_config_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "flows:\n  solar:\n    fields: {state: {}}\n    ping_fields: {state: {}}\n"
        "    pii_fields: []\nbuyers:\n  - {id: a, flows: [solar], ping_url: 'http://a/p',"
        " post_url: 'gopher://a/q'}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert "buyers[0].post_url" in str(info.value)


def test_load_without_path_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PINGPOST_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="PINGPOST_CONFIG"):
        load_settings()


def test_load_from_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINGPOST_CONFIG", str(DEMO))
    assert "solar" in load_settings().flows


def test_demo_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "PINGPOST_KAFKA",
        "PINGPOST_CLICKHOUSE_URL",
        "CLICKHOUSE_PASSWORD",
        "PINGPOST_DEMO_TOKEN",
        "BUYER_SUNRISE_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    s = load_settings(DEMO)
    solar = s.flows["solar"]
    assert set(solar.pii_fields) == {"first_name", "last_name", "email", "phone", "address"}
    assert solar.ping_fields["zip"].transform == "zip3"
    assert not set(solar.ping_fields) & set(solar.pii_fields)
    assert solar.deadline_ms == 750
    assert [b.id for b in s.buyers] == [
        "sunrise",
        "brightpath",
        "greenleaf",
        "voltmarket",
        "backupsolar",
    ]
    assert s.buyer("greenleaf").filters.states == ["CA", "TX", "AZ", "NV", "FL"]
    assert s.kafka.bootstrap == "127.0.0.1:9092"
    assert s.buyer("sunrise").headers["X-Api-Key"].get_secret_value() == "sunrise-demo-key"
    assert s.clickhouse.password.get_secret_value() == ""
    assert set(s.simulator.buyers) == {b.id for b in s.buyers}


def test_demo_config_takes_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINGPOST_KAFKA", "kafka.internal:9093")
    monkeypatch.setenv("BUYER_SUNRISE_KEY", "real-sunrise-key")
    s = load_settings(DEMO)
    assert s.kafka.bootstrap == "kafka.internal:9093"
    assert s.buyer("sunrise").headers["X-Api-Key"].get_secret_value() == "real-sunrise-key"
    assert "real-sunrise-key" not in repr(s)
