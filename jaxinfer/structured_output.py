"""Structured-output constraints of a request (pure Python; llguidance is imported only to build grammars).

:class:`StructuredOutputsParams` names exactly one constraint, as vLLM's ``StructuredOutputsParams``:
``json`` (a JSON schema), ``json_object`` (any JSON object), ``regex``, ``choice`` (one of some strings) or
``grammar`` (a Lark grammar, the syntax llguidance takes; GBNF is converted). Each becomes an llguidance
grammar (:meth:`StructuredOutputsParams.grammar`), checked for validity when the params are built, so a bad
schema or grammar is an ``InvalidRequestError`` naming ``structured_outputs`` before anything is queued.

JSON is generated compactly by default (``,`` and ``:`` with no whitespace around them), which keeps small
models from spending their tokens on indentation; ``whitespace_pattern`` (a regex) allows whitespace there.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from jaxinfer.errors import InvalidRequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
PARAM = "structured_outputs"
MAX_SPEC_BYTES = 1 << 20  # a schema / grammar / regex / all choices together


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One output constraint.

    Attributes:
      json: a JSON schema (dict, or its JSON text); stored as canonical JSON text (hashable).
      json_object: any JSON object (``response_format: {"type": "json_object"}``).
      regex: the whole output matches this regular expression.
      choice: the output is exactly one of these strings.
      grammar: a Lark grammar (llguidance's dialect; a GBNF grammar, one without a ``start:`` rule, is converted).
      whitespace_pattern: JSON only: a regex for the whitespace allowed between tokens (default: none).
      compiled: the constraint's llguidance matcher compiled ahead of time
        (``GrammarMatchers.compile``, e.g. by a server off its engine thread; see :meth:`with_compiled`):
        the engine copies it instead of compiling on its own thread. Not compared, not pickled.
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None
    compiled: object = field(default=None, compare=False, repr=False)

    def with_compiled(self, matcher) -> StructuredOutputsParams:
        """A copy carrying ``matcher`` (a fresh llguidance ``LLMatcher`` of :meth:`grammar_spec`, never
        advanced) as :attr:`compiled`; not validated again."""
        out = copy.copy(self)
        object.__setattr__(out, "compiled", matcher)
        return out

    def __getstate__(self):
        return {**self.__dict__, "compiled": None}

    def __post_init__(self):
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}", PARAM) from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError("a JSON schema must be a JSON object", PARAM)
            object.__setattr__(self, "json", json.dumps(schema, sort_keys=True, ensure_ascii=False))
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidRequestError("choice must be a non-empty list of non-empty strings", PARAM)
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise InvalidRequestError(f"{name} must be a non-empty string", PARAM)
        if not isinstance(self.json_object, bool):
            raise InvalidRequestError("json_object must be a boolean", PARAM)
        given = [k for k in KINDS if (self.json_object if k == "json_object" else getattr(self, k) is not None)]
        if len(given) != 1:
            raise InvalidRequestError(f"exactly one of {', '.join(KINDS)} must be given, got "
                                      f"{', '.join(given) or 'none'}", PARAM)
        if self.whitespace_pattern is not None and given[0] not in ("json", "json_object"):
            raise InvalidRequestError("whitespace_pattern applies to json and json_object only", PARAM)
        size = sum(len(s.encode("utf-8")) for s in (self.json, self.regex, self.grammar, *(self.choice or ()))
                   if s is not None)
        if size > MAX_SPEC_BYTES:
            raise InvalidRequestError(f"the constraint is larger than {MAX_SPEC_BYTES} bytes", PARAM)
        error = validate_grammar(self.grammar_spec())
        if error:
            raise InvalidRequestError(f"invalid {given[0]}: {error}", PARAM)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if (self.json_object if k == "json_object" else getattr(self, k) is not None))

    @staticmethod
    def coerce(value) -> StructuredOutputsParams | None:
        """``None``, a :class:`StructuredOutputsParams`, or a dict of its fields (vLLM's request object)."""
        if value is None or isinstance(value, StructuredOutputsParams):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(KINDS) - {"whitespace_pattern"})
            if unknown:
                raise InvalidRequestError(f"unsupported structured_outputs fields: {unknown}", PARAM)
            return StructuredOutputsParams(**{k: v for k, v in value.items() if v is not None and v is not False})
        raise InvalidRequestError(f"{PARAM} must be a StructuredOutputsParams or an object", PARAM)

    def grammar_spec(self) -> str:
        """The llguidance grammar (its JSON text) of this constraint."""
        from llguidance import LLMatcher

        kind = self.kind
        if kind in ("json", "json_object"):
            options = {"whitespace_flexible": False}
            if self.whitespace_pattern is not None:
                options = {"whitespace_pattern": self.whitespace_pattern}
            schema = self.json if kind == "json" else '{"type": "object"}'
            try:
                return LLMatcher.grammar_from_json_schema(schema, overrides=options)
            except ValueError as e:
                raise InvalidRequestError(f"invalid json schema: {e}", PARAM) from None
        if kind == "regex":
            return LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            text = any_to_lark(self.grammar)  # Lark (has a "start:" rule) as is, GBNF converted
        except Exception as e:  # the GBNF converter raises plain exceptions for bad input
            raise InvalidRequestError(f"invalid grammar (GBNF): {e}", PARAM) from None
        return LLMatcher.grammar_from_lark(text)


def validate_grammar(grammar: str, tokenizer=None) -> str:
    """llguidance's error message for ``grammar`` ("" when valid; warnings are not errors)."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return messages[0] if is_error and messages else ""
