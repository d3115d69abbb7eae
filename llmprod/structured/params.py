"""What a request's output must match: :class:`StructuredOutputs`.

The shape of vLLM's ``StructuredOutputsParams``: exactly one of ``json`` (a JSON
Schema, as a dict or a JSON string), ``regex``, ``choice``, ``grammar`` (Lark) or
``json_object=True`` (any JSON object). Checked at construction; the grammar
itself is compiled at admission (:mod:`llmprod.structured.backend`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmprod.errors import InvalidRequestError

FIELDS = ("json", "regex", "choice", "grammar", "json_object")


def _fail(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, field="structured")


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """The constraint on one request's output (pass it as
    ``SamplingParams(structured=...)``).

    >>> StructuredOutputs(choice=["yes", "no"]).kind
    'choice'
    >>> StructuredOutputs(json={"type": "object"}).to_dict()
    {'json': '{"type":"object"}'}
    """

    json: dict[str, Any] | str | None = None
    """A JSON Schema (dict, or a JSON string holding one)."""
    regex: str | None = None
    """A regular expression the whole output matches."""
    choice: list[str] | tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect; ``start`` is the top rule)."""
    json_object: bool = False
    """Any JSON object."""

    def __post_init__(self) -> None:
        given = [f for f in FIELDS[:-1] if getattr(self, f) is not None]
        if self.json_object is not False:
            given.append("json_object")
        if len(given) != 1:
            raise _fail(
                f"structured outputs need exactly one of {', '.join(FIELDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if not isinstance(self.json_object, bool):
            raise _fail(f"json_object={self.json_object!r} must be True or False")
        if self.json is not None:
            object.__setattr__(self, "json", _schema(self.json))
        if self.regex is not None and (
            not isinstance(self.regex, str) or not self.regex
        ):
            raise _fail(f"regex={self.regex!r} must be a non-empty string")
        if self.grammar is not None and (
            not isinstance(self.grammar, str) or not self.grammar.strip()
        ):
            raise _fail(f"grammar={self.grammar!r} must be a non-empty string")
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not isinstance(choice, (list, tuple)):
                raise _fail(f"choice={choice!r} must be a list of strings")
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise _fail(
                    f"choice={choice!r} must be non-empty strings, at least one"
                )
            object.__setattr__(self, "choice", tuple(choice))

    @property
    def kind(self) -> str:
        """Which field is set: ``"json"``, ``"regex"``, ``"choice"``, ``"grammar"``
        or ``"json_object"``."""
        for f in FIELDS[:-1]:
            if getattr(self, f) is not None:
                return f
        return "json_object"

    @property
    def is_json(self) -> bool:
        """Whether the output is a JSON document (``Completion.parsed`` is set)."""
        return self.kind in ("json", "json_object")

    def to_dict(self) -> dict[str, Any]:
        """The constraint as plain JSON-able values (part of answer-cache keys)."""
        kind = self.kind
        if kind == "json":
            value: Any = json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            value = list(self.choice or ())
        else:
            value = getattr(self, kind)
        return {kind: value}


def _schema(schema: dict[str, Any] | str) -> dict[str, Any]:
    """A JSON Schema as a dict, checked against its metaschema (the error names
    the path inside the schema)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise _fail(f"json: the schema is not valid JSON: {exc}") from exc
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise _fail(f"json must be a JSON Schema object, got {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:  # checked again, with the extra named, at admission
        return schema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise _fail(f"json: invalid schema at {path}: {exc.message}") from exc
    return schema
