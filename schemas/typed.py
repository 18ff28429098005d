"""Typed records generated from the ``.avsc`` files: one ``TypedDict`` per event, so the type
checker sees the events the stages build and read (a misspelt field, a price typed as text).

``schemas/records.py`` is this module's output, committed; ``python -m schemas.typed``
rewrites it after a schema change, and ``tests/unit/test_schemas.py`` fails when it is out of
date. Fields with an Avro default are ``NotRequired`` (fastavro fills them in when a producer
leaves them out); a decoded record has every field.
"""

from __future__ import annotations

import sys
from typing import Any

from schemas import EVENTS, SCHEMA_DIR, _load

__all__ = ["RECORDS_PATH", "render"]

RECORDS_PATH = SCHEMA_DIR / "records.py"

_PRIMITIVE = {
    "string": "str",
    "long": "int",
    "int": "int",
    "double": "float",
    "float": "float",
    "boolean": "bool",
    "bytes": "bytes",
    "null": "None",
}


def _type(node: Any, nested: list[str]) -> str:
    if isinstance(node, str):
        return _PRIMITIVE.get(node, node.rsplit(".", 1)[-1])
    if isinstance(node, list):
        return " | ".join(_type(n, nested) for n in node)
    kind = node["type"]
    if kind == "array":
        return f"list[{_type(node['items'], nested)}]"
    if kind == "map":
        return f"dict[str, {_type(node['values'], nested)}]"
    if kind == "enum":
        return "str"
    if kind == "record":  # an inline record: its own typed dict, written before its user
        nested.append(_record(node, nested))
        return str(node["name"])
    return _type(kind, nested)


def _record(schema: dict[str, Any], nested: list[str]) -> str:
    doc = " ".join(str(schema.get("doc", schema["name"])).split())
    lines = [f"class {schema['name']}(TypedDict):", f'    """{doc}"""', ""]
    for f in schema["fields"]:
        t = _type(f["type"], nested)
        lines.append(
            f"    {f['name']}: NotRequired[{t}]" if "default" in f else f"    {f['name']}: {t}"
        )
    return "\n".join(lines)


def render() -> str:
    """The text of ``schemas/records.py``."""
    blocks: list[str] = []
    names: list[str] = []
    for stem in ["conditions", *EVENTS.values()]:
        nested: list[str] = []
        main = _record(_load(stem), nested)
        blocks += [*nested, main]
    names = sorted(b.split("(", 1)[0].removeprefix("class ") for b in blocks)
    head = (
        '"""The events as typed dicts, generated from the ``.avsc`` files by '
        "``python -m schemas.typed``:\ndo not edit; regenerate after a schema change "
        '(tests/unit/test_schemas.py checks it)."""\n\n'
        "from __future__ import annotations\n\n"
        "from typing import NotRequired, TypedDict\n\n"
        f"__all__ = {names!r}\n"
    )
    return head + "\n\n" + "\n\n\n".join(blocks) + "\n"


if __name__ == "__main__":
    RECORDS_PATH.write_text(render())
    print(f"wrote {RECORDS_PATH}", file=sys.stderr)
