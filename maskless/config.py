"""One dataclass per stage, filled alike from YAML and from CLI flags.

Stage packages define their own config dataclasses (they never import this app); this module
turns any of them into argparse flags and merges YAML values with the flags a user typed:
defaults < YAML < CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

import yaml


def _base_type(tp: Any) -> Any:
    """The concrete type behind Optional[X] / X | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


class _Unset:
    """A flag's value `none`: sets an Optional field to None (a flag's None means "not given")."""


UNSET = _Unset()


def _optional(tp: type):
    """A flag type for an Optional[int/float/str] field: `none` (any case) gives UNSET, else tp(text)."""
    def parse(text: str):
        return UNSET if text.strip().lower() == "none" else tp(text)
    parse.__name__ = tp.__name__  # argparse names the type in its errors
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_list(text: str, item: type) -> list:
    return [item(x.strip()) for x in text.split(",") if x.strip()]


def _parse_amounts(text: str) -> dict[str, float]:
    """NAME=AMOUNT,... (e.g. Ray resources `gpu_stage=1`) as a dict."""
    out = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, amount = part.partition("=")
        try:
            if not part or not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(amount)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT,..., got {text!r}") from None
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of a config dataclass. Defaults are left unset (None) so that
    `build` can tell a typed flag from a default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        if tp is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            item = (typing.get_args(tp) or (str,))[0]
            item = item if item in (int, float, str) else str
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar="A,B,...",
                                type=lambda s, item=item: _parse_list(s, item), help=help_text)
        elif tp in (int, float, str):
            choices = f.metadata.get("choices")
            optional = tp is not str and typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType)
            if optional:
                help_text += "; none: unset"
            parser.add_argument(_flag(f.name), dest=f.name, type=_optional(tp) if optional else tp, default=None,
                                choices=choices, help=help_text)
        elif typing.get_args(tp) == (str, float):
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar="NAME=AMOUNT,...",
                                type=_parse_amounts, help=help_text)
        # other dict-typed fields are YAML-only (e.g. class -> queries)


def build(cls: type, yaml_values: dict | None = None, args: argparse.Namespace | dict | None = None) -> Any:
    """Instantiate cls from defaults, then YAML values, then CLI values (None = not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, val in (yaml_values or {}).items():
        key = key.replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown {cls.__name__} option {key!r}; known: {', '.join(sorted(names))}")
        values[key] = val
    given = vars(args) if isinstance(args, argparse.Namespace) else (args or {})
    for key, val in given.items():
        if key in names and val is not None:
            values[key] = None if val is UNSET else val
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


# Fields that name files or folders. Ray workers do not run in the driver's working directory, so a
# relative path must become absolute before a stage hands it to them.
PATH_FIELDS = ("data", "val_data", "out", "classifier", "model", "gt", "predictions", "local_root", "urls")
MAYBE_PATH_FIELDS = ("backbone_weights", "weights")  # also take keywords such as 'imagenet' or 'none'


def absolute_paths(cfg: Any) -> Any:
    """Make the local relative paths of a config absolute (URIs and keywords stay as they are)."""
    import os

    for name in PATH_FIELDS + MAYBE_PATH_FIELDS:
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not value or "://" in value or os.path.isabs(value):
            continue
        if name in PATH_FIELDS or os.path.exists(value):
            setattr(cfg, name, os.path.abspath(value))
    return cfg


def load_yaml(path: str) -> dict:
    """A YAML config file as a dict, with a clear error for a missing or malformed file."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of stage -> options")
    return data
