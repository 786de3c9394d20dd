"""Which JSON schemas a reply can be held to, decided before the stream starts (a 400 otherwise).

The worker turns a schema into a grammar with llama-cpp-python's converter. That converter
silently ignores what it does not understand (`minimum`, `uniqueItems`, `not`, a `format` it
does not know, `minLength` on a schema without `"type": "string"`, ...), so output would parse
but not match the schema; and it fails on a few things (`$ref` outside the document, a regex
with `\\d` or `(?`). The web process must not load libllama (tests/test_layers.py), so instead of
converting here, every schema is walked in pure Python against the subset the converter
honours, and anything else is refused by name. Sizes are bounded too: the grammar grows with
`maxLength`/`maxItems` (a nested rule per step) and must compile in a blink in the worker.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edison.http.errors import ApiError
from edison.protocol import Format

MAX_SCHEMA_BYTES = 16_000  # as JSON text; real schemas are a few hundred bytes
MAX_COUNT = 500  # minLength/maxLength/minItems/maxItems and regex repetitions: the grammar grows with them
MAX_TOTAL_COUNT = 2_000  # ... and all of them together: ~20 grammar characters each, compiled in the worker
MAX_PATTERN = 256  # characters of a `pattern`
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
# Keywords that describe and constrain nothing: accepted anywhere, ignored.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
CONSTRAINTS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
     "anyOf", "oneOf", "$ref", "pattern", "minLength", "maxLength", "format"}
)
DEFINITIONS = ("$defs", "definitions")
ANY_OBJECT = '{"type": "object"}'  # `json_object` and /chat/stream's "json": any JSON object
# Inside a `pattern`: what the converter turns into a grammar. Escapes only of its own syntax.
_PATTERN_ESCAPE = re.compile(r"\\(.)")
_ESCAPABLE = set(".^$*+?()[]{}|\\/-")
_QUANTIFIER = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def check_schema(schema: Any, param: str) -> str:
    """The schema as compact JSON text, or an ApiError naming what is wrong and where."""
    if not isinstance(schema, dict):
        raise ApiError(f"'{param}' must be a JSON schema object", param=param)
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise ApiError(f"'{param}' is {len(text.encode())} bytes long; the limit is {MAX_SCHEMA_BYTES}", param=param)
    _Walk(schema, param).visit(schema, param)
    return text


class _Walk:
    def __init__(self, root: dict[str, Any], param: str) -> None:
        self.root, self.param = root, param
        self.total = 0  # the sum of every count: what bounds the grammar's size

    def fail(self, where: str, why: str) -> ApiError:
        return ApiError(f"{where}: {why}", param=self.param)

    def visit(self, node: Any, where: str) -> None:
        if not isinstance(node, dict):
            raise self.fail(where, "a schema must be an object")
        for key in node:
            if key not in CONSTRAINTS and key not in ANNOTATIONS and key not in DEFINITIONS:
                raise self.fail(where, f"the keyword {key!r} is not supported (see README, Structured output)")
        constraining = {k for k in node if k in CONSTRAINTS}
        for key in DEFINITIONS:
            if key in node:
                if not isinstance(node[key], dict):
                    raise self.fail(f"{where}.{key}", "must be an object of schemas")
                for name, sub in node[key].items():
                    self.visit(sub, f"{where}.{key}.{name}")
        if "$ref" in node:
            self._ref(node["$ref"], where)
            if constraining != {"$ref"}:
                raise self.fail(where, "'$ref' cannot be combined with other keywords")
            return
        for key in ("anyOf", "oneOf"):
            if key in node:
                if constraining != {key}:
                    raise self.fail(where, f"'{key}' cannot be combined with other keywords")
                if not isinstance(node[key], list) or not node[key]:
                    raise self.fail(f"{where}.{key}", "must be a non-empty list of schemas")
                for i, sub in enumerate(node[key]):
                    self.visit(sub, f"{where}.{key}[{i}]")
                return
        kind = self._type(node.get("type"), where, constraining)
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise self.fail(f"{where}.enum", "must be a non-empty list")
        self._object(node, where, kind)
        self._array(node, where, kind)
        self._string(node, where, kind)

    def _ref(self, ref: Any, where: str) -> None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise self.fail(f"{where}.$ref", "only references inside the schema ('#/$defs/...') are supported")
        target: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise self.fail(f"{where}.$ref", f"{ref!r} does not resolve")
            target = target[part]

    def _type(self, kind: Any, where: str, constraining: set[str]) -> str | None:
        if isinstance(kind, list):
            if not kind or any(k not in TYPES for k in kind):
                raise self.fail(f"{where}.type", f"must be one of {', '.join(TYPES)} or a list of them")
            if constraining - {"type"}:
                raise self.fail(where, "a list of types cannot be combined with other keywords; use anyOf")
            return None
        if kind is not None and kind not in TYPES:
            raise self.fail(f"{where}.type", f"must be one of {', '.join(TYPES)}; got {kind!r}")
        return kind

    def _object(self, node: dict[str, Any], where: str, kind: str | None) -> None:
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise self.fail(f"{where}.properties", "must be an object of schemas")
        for name, sub in properties.items():
            self.visit(sub, f"{where}.properties.{name}")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(f"{where}.required", "must be a list of property names")
        missing = [r for r in required if r not in properties]
        if missing:
            raise self.fail(f"{where}.required", f"names {missing[0]!r}, which is not in 'properties'")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            self.visit(extra, f"{where}.additionalProperties")
        elif extra is not None and not isinstance(extra, bool):
            raise self.fail(f"{where}.additionalProperties", "must be a boolean or a schema")

    def _array(self, node: dict[str, Any], where: str, kind: str | None) -> None:
        if "items" in node:
            self.visit(node["items"], f"{where}.items")  # a list (tuple) form is not a schema: refused there
        for key in ("minItems", "maxItems"):
            if key in node:
                self._count(node, key, where)
                if "items" not in node or kind not in (None, "array"):
                    raise self.fail(where, f"'{key}' needs 'items' (and type 'array') to be enforced")
        if node.get("maxItems", MAX_COUNT) < node.get("minItems", 0):
            raise self.fail(where, "'minItems' is larger than 'maxItems'")

    def _string(self, node: dict[str, Any], where: str, kind: str | None) -> None:
        lengths = [k for k in ("minLength", "maxLength") if k in node]
        for key in lengths:
            self._count(node, key, where)
        if lengths and (kind != "string" or "pattern" in node or "format" in node):
            raise self.fail(where, f"'{lengths[0]}' is enforced only with type 'string' and no pattern or format")
        if node.get("maxLength", MAX_COUNT) < node.get("minLength", 0):
            raise self.fail(where, "'minLength' is larger than 'maxLength'")
        if "format" in node and (node["format"] not in FORMATS or kind not in (None, "string")):
            raise self.fail(f"{where}.format", f"{node['format']!r} is not supported; supported: {', '.join(FORMATS)}")
        if "pattern" in node:
            self._pattern(node["pattern"], f"{where}.pattern", kind)

    def _count(self, node: dict[str, Any], key: str, where: str) -> None:
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise self.fail(f"{where}.{key}", f"must be an integer from 0 to {MAX_COUNT}")
        self._spend(value, f"{where}.{key}")

    def _spend(self, count: int, where: str) -> None:
        self.total += count
        if self.total > MAX_TOTAL_COUNT:
            raise self.fail(where, f"lengths and counts add up to more than {MAX_TOTAL_COUNT}: the grammar would be too large")

    def _pattern(self, pattern: Any, where: str, kind: str | None) -> None:
        if not isinstance(pattern, str) or kind not in (None, "string"):
            raise self.fail(where, "must be a string, on a string schema")
        if len(pattern) > MAX_PATTERN:
            raise self.fail(where, f"is {len(pattern)} characters long; the limit is {MAX_PATTERN}")
        if not (pattern.startswith("^") and pattern.endswith("$")):
            raise self.fail(where, "must be anchored: start with '^' and end with '$'")
        if "(?" in pattern:
            raise self.fail(where, "groups with '(?' (lookarounds, named or non-capturing groups) are not supported")
        for escape in _PATTERN_ESCAPE.finditer(pattern):
            if escape.group(1) not in _ESCAPABLE:
                raise self.fail(where, f"the escape '\\{escape.group(1)}' is not supported; use a class like [0-9]")
        for quantifier in _QUANTIFIER.finditer(pattern):
            counts = [int(n) for n in quantifier.groups() if n]
            if any(n > MAX_COUNT for n in counts):
                raise self.fail(where, f"repetitions above {MAX_COUNT} are not supported")
            self._spend(max(counts, default=0), where)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise self.fail(where, f"is not a valid regular expression: {exc}") from None


def parse_response_format(value: Any, param: str = "response_format") -> Format | None:
    """OpenAI's `response_format`: text (no constraint), any JSON object, or a JSON schema."""
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object" and set(value) == {"type"}:
        return Format(schema=ANY_OBJECT)
    if kind == "json_schema" and isinstance(value.get("json_schema"), dict) and set(value) == {"type", "json_schema"}:
        spec = value["json_schema"]
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise ApiError(f"'{param}.json_schema' has unsupported field(s): {', '.join(unknown)}", param=param)
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ApiError(f"'{param}.json_schema.name' is required and must be a string", param=param)
        return Format(schema=check_schema(spec.get("schema", {"type": "object"}), f"{param}.json_schema.schema"))
    raise ApiError(
        f"'{param}' must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
        f"{{\"type\": \"json_schema\", \"json_schema\": {{\"name\", \"schema\"}}}}", param=param,
    )
