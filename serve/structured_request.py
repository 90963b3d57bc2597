"""Structured-output fields of a request -> :class:`~jaxinfer.structured_output.StructuredOutputsParams`.

Accepted (at most one of them per request; errors name the field the client used):

- OpenAI ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`` (langchain's
  ``with_structured_output`` sends this, with ``strict``);
- vLLM's ``structured_outputs`` object: ``json``, ``json_object``, ``regex``, ``choice``, ``grammar``,
  ``whitespace_pattern``;
- vLLM's older top-level fields ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
  (+ ``guided_whitespace_pattern``).

Parsing the body only finds the constraint (:func:`structured_outputs_from_body`, on the event loop);
validating and compiling it (:func:`build_structured`, seconds for a large schema) runs in the server's
grammar thread under a time limit (``AsyncEngine.prepare_structured``), never on the event loop or the
engine thread.
"""

from __future__ import annotations

import json

from jaxinfer.errors import InvalidRequestError
from jaxinfer.structured_output import StructuredOutputsParams
from serve.errors import bad_param

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_from_body(body: dict) -> tuple[dict | None, str | None]:
    """``(spec, field)``: the request's output constraint (``StructuredOutputsParams`` fields, not yet
    validated: :func:`build_structured`) and the field it came from, or ``(None, None)``.

    Raises:
      BadRequest naming the field: malformed or several constraints.
    """
    found = []
    fmt = body.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(("response_format", spec))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_param("'structured_outputs' must be an object", "structured_outputs", "invalid_type")
        spec = {k: v for k, v in so.items() if k != "structural_tag"}
        tag = so.get("structural_tag")
        if tag is not None:  # vLLM: the response_format object, as a JSON string (or an object)
            if isinstance(tag, str):
                try:
                    tag = json.loads(tag)
                except ValueError:
                    raise bad_param("'structured_outputs.structural_tag' is not valid JSON", "structured_outputs",
                                    "invalid_type") from None
            spec["grammar"] = structural_tag_grammar(tag, "structured_outputs")
        found.append(("structured_outputs", spec))
    guided = {GUIDED[k]: body[k] for k in GUIDED if body.get(k) is not None}
    if guided:
        name = next(k for k in GUIDED if body.get(k) is not None)
        if len(guided) > 1:
            raise bad_param(f"only one of {', '.join(GUIDED)} may be given", name)
        ws = body.get("guided_whitespace_pattern")
        if ws is not None:
            guided["whitespace_pattern"] = ws
        found.append((name, guided))
    if not found:
        return None, None
    if len(found) > 1:
        raise bad_param(f"'{found[0][0]}' and '{found[1][0]}' cannot be used together", found[1][0])
    return found[0][1], found[0][0]


def build_structured(spec: dict, name: str) -> StructuredOutputsParams:
    """Validate ``spec`` (the fields :func:`structured_outputs_from_body` found in ``name``).

    Raises:
      BadRequest naming the field: malformed, or a schema / grammar llguidance refuses.
    """
    try:
        return StructuredOutputsParams.coerce(spec)
    except InvalidRequestError as e:
        raise bad_param(f"'{name}': {e}", name) from None
    except TypeError as e:  # a field of the wrong kind (e.g. a list for a regex)
        raise bad_param(f"'{name}': {e}", name, "invalid_type") from None


def _response_format(fmt) -> dict | None:
    name = "response_format"
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_param("'response_format' must be an object with a string 'type'", name, "invalid_type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "structural_tag":
        return {"grammar": structural_tag_grammar(fmt, name)}
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise bad_param("'response_format.json_schema' must be an object", name, "invalid_type")
        schema = js.get("schema")
        if schema is None:
            raise bad_param("'response_format.json_schema.schema' is required", name, "missing_required_parameter")
        if not isinstance(schema, dict):
            raise bad_param("'response_format.json_schema.schema' must be an object", name, "invalid_type")
        return {"json": schema}
    raise bad_param(f"response_format type {kind!r} is not supported (text, json_object, json_schema, "
                    "structural_tag)", name, "unsupported")


def structural_tag_grammar(tag, param: str) -> str:
    """vLLM's ``{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}``
    as a Lark grammar (llguidance's ``StructTag``): free text, in which each occurrence of a trigger must
    continue as one of the structures whose ``begin`` starts with it: ``begin``, JSON valid against its
    ``schema`` (compact), ``end``; then free text again. The newer ``format`` form (xgrammar's tag
    language) is refused."""
    if not isinstance(tag, dict):
        raise bad_param(f"'{param}': the structural tag must be an object", param, "invalid_type")
    if "format" in tag and "structures" not in tag:
        raise bad_param(f"'{param}': the structural tag 'format' form is not supported by this server's grammar "
                        "library (llguidance); use 'structures' and 'triggers'", param, "unsupported")
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers \
            or not all(isinstance(t, str) and t for t in triggers):
        raise bad_param(f"'{param}': a structural tag needs a non-empty 'structures' list and a non-empty "
                        "'triggers' list of strings", param, "invalid_type")
    from llguidance import StructTag

    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("begin", "end")) \
                or not isinstance(s.get("schema"), (dict, bool)):
            raise bad_param(f"'{param}': structures[{i}] needs string 'begin' and 'end' and an object 'schema'",
                            param, "invalid_type")
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise bad_param(f"'{param}': structures[{i}].begin {s['begin']!r} starts with none of the triggers",
                            param)
        if s["schema"] is False:
            raise bad_param(f"'{param}': structures[{i}].schema false admits nothing", param)
        schema = s["schema"] if isinstance(s["schema"], dict) else {}
        # compact JSON, as every JSON constraint here (a small model would otherwise pad with whitespace)
        schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        tags.append(StructTag(trigger=trigger, begin=s["begin"], grammar=schema, end=s["end"]))
    return StructTag.to_grammar(tags, assume_special=False)
