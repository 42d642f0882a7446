"""Frozen dataclass configs parsed from the command line and an optional YAML preset (unknown keys rejected).

A field is declared with `option(default, "help")`: the help text is the field's one-line comment and the
`--help` text. Precedence: field default < YAML preset (`--config FILE`) < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml


def option(default, help: str, choices: tuple | None = None):
    """A config field with a default and its one-line help."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


class ConfigError(ValueError):
    """An option or preset key that does not exist, or a value of the wrong type; the message names it."""


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one `--field-name` flag per dataclass field, help taken from the field."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset whose keys are these options (underscores); flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        kind = _parse_bool if tp is bool else tp
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=argparse.SUPPRESS,
            choices=f.metadata.get("choices"),
            metavar=tp.__name__.upper() if f.metadata.get("choices") is None else None,
            help=f"{f.metadata.get('help', '')} (default: {f.default!r})",
        )
    return parser


def _check_value(cls, name: str, value, source: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp = _base_type(typing.get_type_hints(cls)[name])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is not None and not isinstance(value, tp):
        raise ConfigError(f"{source}: {name!r} must be {tp.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: {name!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def load_preset(cls, path: str | Path) -> dict:
    """Read a YAML preset; a key that is not a field of `cls` is an error naming it."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of option: value")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return {k: _check_value(cls, k, v, str(path)) for k, v in data.items()}


def parse_config(cls, argv: list[str] | None, description: str):
    """Parse argv (and the preset it names) into a frozen `cls` instance; errors exit with a usage message."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    preset = args.pop("config", None)
    values = {}
    try:
        if preset:
            values.update(load_preset(cls, preset))
        values.update(args)
        return cls(**values)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))


def to_dict(cfg) -> dict:
    """The resolved config as plain JSON-able data."""
    return dataclasses.asdict(cfg)


def save_json(obj, path: str | Path) -> None:
    """Write JSON readably, via a temporary file so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
