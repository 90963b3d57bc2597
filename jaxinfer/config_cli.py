"""Command-line flags generated from :class:`~jaxinfer.config.EngineConfig` (one place for every sub-command).

Each dataclass field becomes one ``--kebab-case`` flag (``metadata["flag"]`` overrides the name); the value
type comes from the field's annotation:

* ``int`` / ``float`` / ``str``: that type; ``metadata["choices"]`` (or a ``Literal[...]``) restricts it;
* ``bool``: ``--x`` / ``--no-x`` (``argparse.BooleanOptionalAction``);
* ``X | None``: as ``X``; a union of several scalar types (``int | str``) tries them in order;
* the help text is ``metadata["help"]`` plus the EngineConfig default.

Every flag defaults to ``None``, meaning "the EngineConfig default", so :func:`engine_config_kwargs` passes
on only the flags given. A field with ``metadata["cli"] = False`` gets no flag (put the reason next to it);
any other field whose type has no command-line form is an error here, so a new field cannot silently miss
its flag.

This module imports neither jax nor the engine: ``jaxinfer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from jaxinfer.config import EngineConfig

_SCALARS = (int, float, str)


@dataclasses.dataclass(frozen=True)
class EngineFlag:
    """How one EngineConfig field appears on the command line."""

    field: str  # EngineConfig field name
    flag: str  # "--max-num-seqs"
    dest: str  # attribute of the parsed namespace


def skipped_fields(cls: type = EngineConfig) -> list[str]:
    """Fields of ``cls`` that deliberately have no flag (``metadata["cli"] = False``)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("cli", True)]


def engine_flags(cls: type = EngineConfig) -> list[EngineFlag]:
    """The generated flags of ``cls`` (default EngineConfig), in field order."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append(EngineFlag(f.name, flag, flag[2:].replace("-", "_")))
    return out


def _union_type(options: tuple[type, ...]):
    """An argparse ``type`` that tries each scalar type in annotation order (``int | str``: "2GiB" stays a
    string, "1024" becomes an int)."""

    def convert(text: str):
        for t in options:
            try:
                return t(text)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"invalid value {text!r}")

    convert.__name__ = " | ".join(t.__name__ for t in options)  # argparse names it in errors
    return convert


def _argparse_kwargs(f: dataclasses.Field, annotation) -> dict[str, Any]:
    """``add_argument`` keyword arguments for field ``f`` with its resolved type ``annotation``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = [a for a in args if a is not type(None)]
        annotation = annotation[0] if len(annotation) == 1 else tuple(annotation)
        args = typing.get_args(annotation) if not isinstance(annotation, tuple) else ()
    choices = f.metadata.get("choices")
    if typing.get_origin(annotation) is typing.Literal:
        choices = choices or tuple(a for a in args if a is not None)
        annotation = type(choices[0])
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in _SCALARS:
        kw: dict[str, Any] = {"type": annotation}
    elif isinstance(annotation, tuple) and all(a in _SCALARS for a in annotation):
        kw = {"type": _union_type(annotation)}
    else:
        raise TypeError(f"{f.name}: no command-line form for {annotation!r}; give the field "
                        "metadata['cli'] = False and say why in a comment")
    if choices is not None:
        kw["choices"] = tuple(choices)
    return kw


def _help(f: dataclasses.Field) -> str:
    """``metadata["help"]``, plus the default unless the help states it (or the default is ``None``)."""
    text = f.metadata.get("help", "")
    if "(default:" not in text and f.default not in (None, dataclasses.MISSING):
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        text += f" (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_engine_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type = EngineConfig,
                    exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls`` (default EngineConfig) to ``parser`` (a parser or an argument group),
    except the fields named in ``exclude`` (a sub-command that gives the flag another meaning)."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for ef in engine_flags(cls):
        if ef.field in exclude:
            continue
        f = by_name[ef.field]
        parser.add_argument(ef.flag, dest=ef.dest, default=None, help=_help(f), **_argparse_kwargs(f, hints[f.name]))


def engine_config_kwargs(args: argparse.Namespace, cls: type = EngineConfig) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (flags left unset are left out)."""
    values = {ef.field: getattr(args, ef.dest, None) for ef in engine_flags(cls)}
    return {k: v for k, v in values.items() if v is not None}


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """An :class:`EngineConfig` from the parsed flags (unset flags keep the EngineConfig defaults)."""
    return EngineConfig(**{**engine_config_kwargs(args), **overrides})
