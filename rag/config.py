"""Typed service configuration: one dataclass per service, every field a CLI flag with an env mirror.

A field `max_new_tokens` becomes `--max-new-tokens`, mirrored by `RAG_MAX_NEW_TOKENS`; precedence is
flag > environment > dataclass default. `--help` shows the mirror and the default of each flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")
ENV_PREFIX = "RAG_"


def option(default: Any, help: str, required: bool = False) -> Any:  # noqa: A002 - argparse's name
    """A config field with its --help text; a required one must come from its flag or its env mirror."""
    return dataclasses.field(default=default, metadata={"help": help, "required": required})


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_parser(field_type: Any) -> Any:
    """The callable that turns a flag's text into the field's type (`str | None` -> str)."""
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        field_type = next(t for t in typing.get_args(field_type) if t is not type(None))
    if field_type is bool:
        return _parse_bool
    return field_type


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, skip: frozenset[str] = frozenset()) -> None:
    """Add one flag per field of `config_class`, defaulting to its env mirror, then to the field default."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        parse = _field_parser(hints[field.name])
        env = env_name(field.name)
        default = field.default
        if env in os.environ:
            try:
                default = parse(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError) as err:
                parser.error(f"{env}={os.environ[env]!r} is not valid for {flag_name(field.name)}: {err}")
        help_text = f"{field.metadata.get('help', '')} [env {env}" + (
            "]" if field.metadata.get("required") else f"; default {field.default!r}]"
        )
        if parse is _parse_bool:  # --flag / --no-flag, taking no value
            parser.add_argument(
                flag_name(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        parser.add_argument(
            flag_name(field.name),
            dest=field.name,
            type=parse,
            default=default,
            required=bool(field.metadata.get("required")) and env not in os.environ,
            metavar=field.name.upper(),
            help=help_text,
        )


def config_from_args(config_class: type[C], args: argparse.Namespace) -> C:
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})
