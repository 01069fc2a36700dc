"""Command-line flags generated from the config classes, so each setting is defined once: its field gives the flag's
name, type, default and choices, and the comment beside the field is its help. Commands parse straight into their
config, whose own checks (`__post_init__`, pydantic constraints) then run the same for the CLI, `jobs/`,
`serve/config.yaml` and Python callers.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from jbert_ray.errors import UserError


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line where the generated flag would not do."""

    name: str | None = None  # the flag (default: --field-name)
    aliases: tuple[str, ...] = ()  # old spellings: still accepted, not shown in --help
    metavar: str | None = None
    hidden: bool = False  # a setting for Python callers and config files only


@dataclass(frozen=True)
class _Setting:
    name: str
    kind: Any
    default: Any  # dataclasses.MISSING when required
    comment: str


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, flags: dict[str, Flag] | None = None, prefix: str = ""
) -> None:
    """One flag per setting of `cls` (nested config classes flattened; `flags` keys are dotted paths)."""
    flags = flags or {}
    for setting in _settings(cls):
        path = prefix + setting.name
        if _is_config(setting.kind):
            add_config_flags(parser, setting.kind, flags, prefix=path + ".")
            continue
        spec = flags.get(path, Flag())
        if spec.hidden:
            continue
        base = _unwrap_optional(setting.kind)
        kwargs: dict[str, Any] = {"dest": path, "help": setting.comment.replace("%", "%%")}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs.update(choices=typing.get_args(base), type=type(typing.get_args(base)[0]))
        else:
            kwargs["type"] = base
        name = spec.name or "--" + setting.name.replace("_", "-")
        if spec.metavar or "type" in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = spec.metavar or name.lstrip("-").replace("-", "_").upper()
        if setting.default is dataclasses.MISSING:
            kwargs.update(required=True, default=argparse.SUPPRESS)  # no "(default: None)" in --help
        else:
            kwargs["default"] = setting.default
        parser.add_argument(name, **kwargs)
        for alias in spec.aliases:  # same destination, no default of its own, not in --help
            hidden = {k: v for k, v in kwargs.items() if k not in ("required", "default", "help")}
            parser.add_argument(alias, **hidden, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def config_from_args(
    cls: type, args: argparse.Namespace, flags: dict[str, Flag] | None = None, prefix: str = ""
):
    """Build `cls` from parsed flags (`flags` only name them in error messages)."""
    values = {}
    for setting in _settings(cls):
        path = prefix + setting.name
        if _is_config(setting.kind):
            values[setting.name] = config_from_args(setting.kind, args, flags, prefix=path + ".")
        elif hasattr(args, path):
            values[setting.name] = getattr(args, path)
    if dataclasses.is_dataclass(cls):
        return cls(**values)
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as error:  # a pydantic model (ServeArgs): its constraints, as one line
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        flag = (flags or {}).get(prefix + name, Flag()).name or "--" + name.replace("_", "-")
        raise UserError(f"{flag}: {first['msg']}") from None


@cache
def _settings(cls: type) -> tuple[_Setting, ...]:
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    if dataclasses.is_dataclass(cls):
        return tuple(
            _Setting(f.name, hints[f.name], _default(f), comments.get(f.name, ""))
            for f in dataclasses.fields(cls)
        )
    return tuple(  # a pydantic model (ServeArgs)
        _Setting(name, hints[name], dataclasses.MISSING if info.is_required() else info.get_default(
            call_default_factory=True), comments.get(name, ""))
        for name, info in cls.model_fields.items()
    )  # fmt: skip


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _field_comments(cls: type) -> dict[str, str]:
    """The comment on (or inside) each field's line of the class body: `name: int = 3  # the help`."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments_by_line = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    comments = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            found = [comments_by_line[line] for line in lines if line in comments_by_line]
            comments[node.target.id] = " ".join(found)
    return comments


def _is_config(kind: Any) -> bool:
    return inspect.isclass(kind) and dataclasses.is_dataclass(kind)


def _unwrap_optional(kind: Any) -> Any:
    """`X | None` → X (the flag's type); anything else unchanged."""
    args = typing.get_args(kind)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return kind
