"""A fast yes/no check for the protocol's JSON Schemas, compiled once into one Python function.

``jsonschema`` takes ~160 us per sample payload, most of the collector's time
per message. The protocol's schemas use a small set of keywords (type,
required, properties, additionalProperties, items, const, enum, pattern,
minimum, maximum, minItems, maxItems), so they compile into plain Python
checks that answer "valid?" with the same verdict (a test compares them with
jsonschema on thousands of mutated payloads), generated as the source of one
function: 9 us per sample payload here, against 26 us for one closure per
keyword. A schema with any other
assertion keyword is refused at compile time (the caller then uses
jsonschema alone); the collector still asks jsonschema *why* a payload fails.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping

__all__ = ["compile_schema", "Unsupported"]

Check = Callable[[Any], bool]
_ANNOTATIONS = {"$schema", "$id", "title", "description", "format", "contentEncoding", "contentMediaType",
                "examples", "default", "$comment"}


class Unsupported(ValueError):
    """The schema uses a keyword this compiler does not implement."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_TYPES: Dict[str, Check] = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "number": _is_number,
    "integer": lambda x: (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer()),
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b if not (_is_number(a) and _is_number(b)) else a == b


_KEYWORDS = {"type", "required", "properties", "additionalProperties", "items", "const", "enum", "pattern", "minimum",
             "maximum", "minItems", "maxItems"}
_NUM = "(isinstance({v}, (int, float)) and not isinstance({v}, bool))"
_TYPE_EXPR = {
    "object": "isinstance({v}, dict)",
    "array": "isinstance({v}, list)",
    "string": "isinstance({v}, str)",
    "number": _NUM,
    "integer": "((isinstance({v}, int) and not isinstance({v}, bool))"
               " or (isinstance({v}, float) and {v}.is_integer()))",
    "boolean": "isinstance({v}, bool)",
    "null": "{v} is None",
}


def _when(guard: str) -> str:
    """A guard in front of a test in generated source: nothing when it is known to hold."""
    return "" if guard == "True" else f"{guard} and "


def compile_schema(schema: Any) -> Check:
    """A function ``instance -> bool`` equal to ``jsonschema.Draft202012Validator(schema).is_valid``.

    The schema becomes the source of one function (no call per keyword or per property: the calls were
    most of the cost), checked against the closure compiler below and jsonschema by the tests."""
    _compile_closures(schema)  # refuses what is not supported, the same way
    consts: List[Any] = []
    lines: List[str] = []
    counter = [0]

    def const(value: Any) -> str:
        consts.append(value)
        return f"_C[{len(consts) - 1}]"

    def gen(sch: Any, v: str, ind: str) -> None:
        if sch is True or sch == {}:
            return
        if sch is False:
            lines.append(f"{ind}return False")
            return
        # After a single "type", later keywords need not ask the type again (their guards become True).
        known = sch.get("type") if isinstance(sch.get("type"), str) else None
        is_num = "True" if known in ("number", "integer") else _NUM.format(v=v)
        is_str = "True" if known == "string" else f"isinstance({v}, str)"
        is_list = "True" if known == "array" else f"isinstance({v}, list)"
        is_dict = "True" if known == "object" else f"isinstance({v}, dict)"
        if "type" in sch:
            names = [sch["type"]] if isinstance(sch["type"], str) else list(sch["type"])
            lines.append(f"{ind}if not ({' or '.join(_TYPE_EXPR[n].format(v=v) for n in names)}): return False")
        if "const" in sch:
            c = sch["const"]
            if type(c) is str:
                lines.append(f"{ind}if type({v}) is not str or {v} != {const(c)}: return False")
            else:
                lines.append(f"{ind}if not _equal({v}, {const(c)}): return False")
        if "enum" in sch:
            options = list(sch["enum"])
            if options and all(type(o) is str for o in options):
                lines.append(f"{ind}if type({v}) is not str or {v} not in {const(frozenset(options))}: return False")
            else:
                lines.append(f"{ind}if not any(_equal({v}, o) for o in {const(options)}): return False")
        if "pattern" in sch:
            lines.append(f"{ind}if {_when(is_str)}{const(re.compile(sch['pattern']))}.search({v}) is None: return False")
        if "minimum" in sch:
            lines.append(f"{ind}if {_when(is_num)}{v} < {const(sch['minimum'])}: return False")
        if "maximum" in sch:
            lines.append(f"{ind}if {_when(is_num)}{v} > {const(sch['maximum'])}: return False")
        if "minItems" in sch:
            lines.append(f"{ind}if {_when(is_list)}len({v}) < {const(sch['minItems'])}: return False")
        if "maxItems" in sch:
            lines.append(f"{ind}if {_when(is_list)}len({v}) > {const(sch['maxItems'])}: return False")
        if "items" in sch and sch["items"] is not True and sch["items"] != {}:
            counter[0] += 1
            x = f"v{counter[0]}"
            lines.append(f"{ind}if {is_list}:")
            lines.append(f"{ind}    for {x} in {v}:")
            gen(sch["items"], x, ind + "        ")
        props = sch.get("properties") or {}
        if "required" in sch and sch["required"]:
            present = " and ".join(f"{const(k)} in {v}" for k in sch["required"])
            lines.append(f"{ind}if {_when(is_dict)}not ({present}): return False")
        extra = sch.get("additionalProperties", True)
        todo = [(k, sub) for k, sub in props.items() if not (sub is True or sub == {})]
        if todo or not (extra is True or extra == {}):
            lines.append(f"{ind}if {is_dict}:")
            for k, sub in todo:
                counter[0] += 1
                x = f"v{counter[0]}"
                key = const(k)
                lines.append(f"{ind}    if {key} in {v}:")
                lines.append(f"{ind}        {x} = {v}[{key}]")
                gen(sub, x, ind + "        ")
            if not (extra is True or extra == {}):
                counter[0] += 1
                x = f"v{counter[0]}"
                lines.append(f"{ind}    for k{counter[0]}, {x} in {v}.items():")
                lines.append(f"{ind}        if k{counter[0]} not in {const(frozenset(props))}:")
                gen(extra, x, ind + "            ")
        lines.append(f"{ind}pass")

    gen(schema, "v0", "    ")
    source = "def check(v0):\n" + "\n".join(lines) + "\n    return True\n"
    namespace: Dict[str, Any] = {"_C": consts, "_equal": _equal}
    exec(compile(source, "<fastschema>", "exec"), namespace)  # noqa: S102 - source built above from the schema
    return namespace["check"]


def _compile_closures(schema: Any) -> Check:
    """The same check as closures (one per keyword): the reference the generated function is tested against."""
    if schema is True or schema == {}:
        return lambda x: True
    if schema is False:
        return lambda x: False
    if not isinstance(schema, Mapping):
        raise Unsupported(f"schema {schema!r} is not an object or boolean")
    unknown = set(schema) - _ANNOTATIONS - {
        "type", "required", "properties", "additionalProperties", "items", "const", "enum", "pattern", "minimum",
        "maximum", "minItems", "maxItems",
    }
    if unknown:
        raise Unsupported(f"keywords {sorted(unknown)} are not compiled")
    checks: List[Check] = []
    if "type" in schema:
        names = [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
        tests = [_TYPES[n] for n in names]
        checks.append(tests[0] if len(tests) == 1 else (lambda x, tests=tests: any(t(x) for t in tests)))
    if "const" in schema:
        const = schema["const"]
        checks.append(lambda x: _equal(x, const))
    if "enum" in schema:
        options = list(schema["enum"])
        checks.append(lambda x: any(_equal(x, o) for o in options))
    if "pattern" in schema:
        rx = re.compile(schema["pattern"])
        checks.append(lambda x: not isinstance(x, str) or rx.search(x) is not None)
    if "minimum" in schema:
        lo = schema["minimum"]
        checks.append(lambda x: not _is_number(x) or not x < lo)
    if "maximum" in schema:
        hi = schema["maximum"]
        checks.append(lambda x: not _is_number(x) or not x > hi)
    if "minItems" in schema:
        n_min = schema["minItems"]
        checks.append(lambda x: not isinstance(x, list) or len(x) >= n_min)
    if "maxItems" in schema:
        n_max = schema["maxItems"]
        checks.append(lambda x: not isinstance(x, list) or len(x) <= n_max)
    if "items" in schema:
        item = _compile_closures(schema["items"])
        checks.append(lambda x: not isinstance(x, list) or all(item(v) for v in x))
    if "required" in schema:
        required = list(schema["required"])
        checks.append(lambda x: not isinstance(x, dict) or all(k in x for k in required))
    props = {k: _compile_closures(v) for k, v in (schema.get("properties") or {}).items()}
    if props:
        items = list(props.items())

        def check_properties(x: Any) -> bool:
            if isinstance(x, dict):
                for k, c in items:
                    if k in x and not c(x[k]):
                        return False
            return True

        checks.append(check_properties)
    if "additionalProperties" in schema:
        extra = _compile_closures(schema["additionalProperties"])
        checks.append(lambda x: not isinstance(x, dict) or all(extra(v) for k, v in x.items() if k not in props))
    if len(checks) == 1:
        return checks[0]

    def check_all(x: Any) -> bool:
        for c in checks:
            if not c(x):
                return False
        return True

    return check_all
