"""Frozen dataclass configs parsed from the command line and an optional YAML preset, with transformers'
`HfArgumentParser`, so the names Hugging Face and TRL users type first work here too.

A field is declared with `option(default, "help", choices, aliases)`. Every field takes `--field-name` and
`--field_name`; `aliases` adds the `TrainingArguments`/TRL name of the same option (`learning_rate` for `lr`), in
both spellings. Booleans take `--flag`, `--no-flag` and `--flag true|false`. A preset (`--config FILE`) may use
any of those names as keys; an unknown key is an error naming it. Precedence: field default < preset < flag.
Nothing heavy is imported here, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

import yaml

_ARGPARSE_KEYS = ("help", "choices", "aliases")


def option(default, help: str, choices: tuple | None = None, aliases: tuple[str, ...] = ()):
    """A config field with a default, its one-line help, allowed values, and other names (HF/TRL spellings)."""
    flags = []
    for alias in aliases:
        flags += [f"--{alias}", f"--{alias.replace('_', '-')}"]
    metadata = {"help": help.replace("%", "%%"), "choices": choices, "aliases": list(dict.fromkeys(flags))}
    return dataclasses.field(default=default, metadata={k: v for k, v in metadata.items() if v})


class ConfigError(ValueError):
    """An option or preset key that does not exist, or a value of the wrong type; the message names it."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's command lines as written and shows every default that says something (not an empty
    one, not on a `--no-flag`)."""

    def _get_help_string(self, action):
        if action.default in ("", None) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _names(cls) -> dict[str, str]:
    """Every spelling an option may be given as (without dashes) -> its field name."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = out[f.name.replace("_", "-")] = f.name
        for flag in f.metadata.get("aliases", []):
            out[flag.lstrip("-")] = f.name
    return out


def _group_by_section(parser: argparse.ArgumentParser, cls) -> None:
    """Move each option into its section's argument group (`cls._sections`: title -> field names), so `--help`
    reads by topic instead of one flat list of options (a boolean's `--no-flag` goes with it)."""
    sections = getattr(cls, "_sections", None)
    if not sections:
        return
    for title, names in sections.items():
        group = parser.add_argument_group(title)
        for action in [a for a in parser._actions if a.dest in names]:
            if action.option_strings and action.option_strings[0].startswith("--no"):
                action.help, action.default = f"turn --{action.dest.replace('_', '-')} off", argparse.SUPPRESS
            for other in parser._action_groups:
                if action in other._group_actions:
                    other._group_actions.remove(action)
            group._group_actions.append(action)


def _one_line_error(parser: argparse.ArgumentParser, message: str):
    """An error as one line (not argparse's 60-line usage), with the nearest option for a misspelt or foreign flag."""
    import difflib
    import re

    if message.startswith("unrecognized arguments"):
        known = [s for action in parser._actions for s in action.option_strings]
        hints = []
        for flag in re.findall(r"--?[\w-]+", message.split(":", 1)[1]):
            near = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
            hints += [f"{flag}: did you mean {near[0]}?"] if near else []
        message += ("; " + "; ".join(hints)) if hints else ""
    parser.exit(2, f"{parser.prog}: error: {message} (--help lists the options)\n")


def build_parser(cls, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a config dataclass: HfArgumentParser's flags plus `--no-flag` for every boolean and `--config`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, description=description, formatter_class=_Formatter, prog=prog)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        # HfArgumentParser adds `--no_x` only for booleans that default to True; users expect it for all of them.
        if hints[f.name] is bool and f.default is False:
            names = [f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"]
            parser.add_argument(*names, action="store_false", dest=f.name, default=False, help=argparse.SUPPRESS)
    _group_by_section(parser, cls)
    parser.add_argument("--config", help="YAML preset whose keys are these options; flags override it")
    parser.error = lambda message: _one_line_error(parser, message)  # type: ignore[method-assign]
    positional = getattr(cls, "_positional", None)
    if positional:
        parser.add_argument("positional", nargs="*", metavar=positional.upper(), help=f"same as --{positional}")
    return parser


def _preset_argv(cls, path: str | Path) -> list[str]:
    """A YAML preset as command-line arguments (so the parser checks its values exactly as it checks flags)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        # Aliases are refused before anything is built: nested ones ("billion laughs") expand exponentially, and a
        # preset of plain options never needs them.
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ConfigError(
                f"--config {path}: YAML aliases (*name) are not accepted in presets; write the values out"
            )
        data = yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of option: value")
    names = _names(cls)
    unknown = sorted(str(k) for k in data if str(k) not in names)
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {known}")
    argv = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        argv += [f"--{names[str(key)]}", str(value)]
    return argv


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _foreign_flags(cls, argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Translate the flags of other tools that mean something here (`cls._foreign`: TRL name -> (field, value) for a
    switch, "--flag" for a rename, or a one-line answer for a flag with no counterpart), before parsing. A switch
    takes an optional true/false. `--push_to_hub true --hub_model_id R` (TrainingArguments' pair) pushes to R."""
    foreign, out, i = getattr(cls, "_foreign", {}), [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        flag, eq, value = arg.partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else ""
        target = foreign.get(name)
        if target is None:
            out.append(arg)
            continue
        switch = isinstance(target, tuple) or name == "push_to_hub"
        takes_next = i < len(argv) and not argv[i].startswith("--")
        if not eq and takes_next and (not switch or name == "push_to_hub" or argv[i].lower() in _TRUE + _FALSE):
            value, i = argv[i], i + 1
        if name == "push_to_hub":
            if value == "" or value.lower() in _TRUE:  # TrainingArguments' boolean: the repository is --hub_model_id
                if not any(a.lstrip("-").replace("-", "_").startswith("hub_model_id") for a in argv):
                    parser.error("--push_to_hub true: name the repository with --hub_model_id USER/NAME")
            elif value.lower() not in _FALSE:
                out += ["--push_to_hub", value]
        elif isinstance(target, tuple):
            out += [f"--{target[0]}", target[1]] if value.lower() not in _FALSE else []
        elif target.startswith("--"):
            out += [target, value] if value else [target]
        else:
            parser.error(f"--{name} has no counterpart here: {target}")
    return out


def parse_config(cls, argv: list[str] | None, description: str, prog: str | None = None):
    """Parse argv (and the preset it names) into a frozen `cls` instance; errors exit with a message naming them."""
    parser = build_parser(cls, description, prog)
    argv = _foreign_flags(cls, list(sys.argv[1:] if argv is None else argv), parser)
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config")
    preset = pre_parser.parse_known_args(argv)[0].config
    preset_argv = []
    if preset:
        try:
            preset_argv = _preset_argv(cls, preset)
        except ConfigError as exc:
            parser.error(str(exc))
        # The preset's values alone first, so a bad one is reported against the preset, not a flag.
        checker = build_parser(cls, description, prog)
        checker.error = lambda message: parser.error(f"--config {preset}: {message}")  # type: ignore[method-assign]
        checker.parse_args(preset_argv)
    args = vars(parser.parse_args(preset_argv + argv))
    args.pop("config", None)
    positional = args.pop("positional", None)
    if positional:
        name = cls._positional
        default = cls.__dataclass_fields__[name].default
        given = args.get(name)
        args[name] = ",".join(positional if given in (None, "", default) else [given, *positional])
    try:
        return cls(**args)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))


def config_from_dict(cls, values: dict):
    """A config from a dict of field names (a saved `train_config.json`, a Python caller); unknown keys refused."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}")
    return cls(**values)


def to_dict(cfg) -> dict:
    """The resolved config as plain JSON-able data."""
    return dataclasses.asdict(cfg)
