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
        if so.get("structural_tag") is not None:
            raise bad_param("'structured_outputs.structural_tag' is not supported", "structured_outputs",
                            "unsupported")
        found.append(("structured_outputs", {k: v for k, v in so.items() if k != "structural_tag"}))
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
    raise bad_param(f"response_format type {kind!r} is not supported (text, json_object, json_schema)", name,
                    "unsupported")
