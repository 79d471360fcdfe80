"""The command-line flags made from TrustConfig's fields (trust_fast.config): a field whose metadata
has a `flag` is the flag --its-name, with its type, choices and help taken from the field, grouped
as the fields are. Every such flag defaults to None: unset, it leaves the method's value."""
from __future__ import annotations

import argparse
from dataclasses import Field, fields

from ..config import TrustConfig
from .common import UserError, flag


def flag_fields(names: tuple[str, ...] | None = None) -> list[Field]:
    """TrustConfig's fields that are flags (all of them, or those in `names`), in field order."""
    return [f for f in fields(TrustConfig) if "flag" in f.metadata and (names is None or f.name in names)]


def _kinds(f: Field) -> set[str]:
    """The types a field's annotation allows besides None: 'int | None' -> {'int'}."""
    return {a.strip() for a in f.type.split("|")} - {"None"}


def _is_list(f: Field) -> bool:
    """A tuple field, given on the command line as comma-separated items."""
    return any(k.startswith("tuple[") for k in _kinds(f))


def _shown(value) -> str:
    """A default as a help text shows it: booleans as on / off."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _help(f: Field) -> str:
    """The field's help, then how the flag is written (comma-separated) and its default."""
    default = "the method's" + ("" if f.default is None else f"; TRUST's is {_shown(f.default)}")
    items = "comma-separated; " if _is_list(f) else ""
    return f"{f.metadata['help']} ({items}default: {default})".replace("%", "%%")


def _argparse_options(f: Field) -> dict:
    """add_argument's options for a field: its annotation gives the action or type (text as given
    for str, comma-separated tuples and bool | str), its metadata the choices and any other options."""
    kinds, options = _kinds(f), {"default": None, "help": _help(f)}
    if kinds == {"bool"}:
        options["action"] = "store_true"
    elif kinds in ({"int"}, {"float"}):
        options["type"] = int if kinds == {"int"} else float
    elif kinds not in ({"str"}, {"tuple[str, ...]"}, {"bool", "str"}):
        raise TypeError(f"TrustConfig.{f.name} ({f.type}) has no command-line form")
    if "choices" in f.metadata:
        options["choices"] = f.metadata["choices"]
    return {**options, **f.metadata["flag"]}


def add_config_flags(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add the flags of TrustConfig's flag fields (or those in `names`) to `p`, one argument group
    per config group."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in flag_fields(names):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(f"TrustConfig: {group}")
        groups[group].add_argument(flag(f.name), **_argparse_options(f))


def config_overrides(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> dict:
    """The TrustConfig fields the command line set (flag_fields(names) that are not None); a
    comma-separated flag gives the tuple of its non-blank items."""
    out = {}
    for f in flag_fields(names):
        value = getattr(args, f.name, None)
        if _is_list(f):
            if not value:  # unset, or given as '': the method's patterns
                continue
            value = tuple(t.strip() for t in value.split(",") if t.strip())
            if not value:
                raise UserError(f"{flag(f.name)} {getattr(args, f.name)!r} names no module pattern")
        if value is not None:
            out[f.name] = value
    return out
