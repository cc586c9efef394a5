"""Command-line options generated from frozen dataclasses, so every default is defined once.

A field's ``metadata`` may carry ``help`` (required), ``choices``, ``flag`` (another option
name), ``positional`` (True for a positional argument) and ``nargs``; a ``tuple[X, ...]`` field
takes several values of type X.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["add_config_arguments", "config_from_args", "option"]

T = TypeVar("T", bound="DataclassInstance")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with command-line metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _scalar_type(annotation: Any) -> type:
    """The type of one command-line value (``X`` for ``X | None`` and ``tuple[X, ...]``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    if origin in (tuple, list):
        return typing.get_args(annotation)[0]
    return annotation


def _path(text: str) -> Path:
    """A path option's value; an empty one is refused (``Path("")`` would silently be ``.``)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return Path(text)


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """Add one option per field of the dataclass ``config`` to ``parser``."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        meta = field.metadata
        kind = _scalar_type(hints[field.name])
        default = field.default
        help_text = meta["help"]
        if default not in (None, ()) and not meta.get("positional"):
            help_text += " (default: %(default)s)"
        kwargs: dict[str, Any] = {"help": help_text, "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _path if kind is Path else kind
            kwargs["metavar"] = meta.get("metavar", field.name.upper())
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
            kwargs.pop("metavar", None)
        if meta.get("positional"):
            if "nargs" not in meta:
                kwargs.pop("default")
            parser.add_argument(field.name, **kwargs)
        else:
            flag = meta.get("flag", "--" + field.name.replace("_", "-"))
            parser.add_argument(flag, dest=field.name, **kwargs)


def config_from_args(config: type[T], namespace: argparse.Namespace) -> T:
    """Build the dataclass ``config`` from the parsed options."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(namespace, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config(**values)
