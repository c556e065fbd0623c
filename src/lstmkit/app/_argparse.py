"""Command-line plumbing the subcommands share: a parser whose errors are one line with a
"did you mean", options derived from :class:`lstmkit.app.config.TrainConfig`'s fields (help
and defaults from the field, given values only), and ``KEY=VALUE`` task options.

This is not the command line itself (:mod:`lstmkit.app.cli`); subcommand modules use it to
declare their arguments without importing the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from lstmkit._suggest import did_you_mean
from lstmkit._validate import loads_json
from lstmkit.app.config import TASK_FIELDS, Option, TrainConfig, option_of

__all__ = ["Parser", "add_config_options", "add_task_options", "config_values", "key_value", "default_text", "path_arg"]

_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)' \(choose from (?P<choices>.*)\)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) with a suggestion
    for a mistyped option or choice; exit code 2 as argparse's. Unrecognised arguments
    are reported by the subcommand they were given to (its options are the suggestions).
    """

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = _innermost(self, ns)
            hint = getattr(sub, "hint", None)
            sub.error(f"unrecognized arguments: {' '.join(extras)}" + (hint(extras, ns) if hint else ""))
        return ns

    def error(self, message: str) -> NoReturn:
        m = _CHOICE.search(message)
        if m:
            choices = re.findall(r"'([^']*)'", m["choices"])
            message += did_you_mean(m["word"], choices)
        elif message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            flag = next((w.split("=")[0] for w in words if w.startswith("-")), None)
            if flag and "did you mean" not in message:
                message += did_you_mean(flag, _all_flags(self))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _innermost(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the subcommand that ``ns`` chose."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(ns, action.dest, None) in action.choices:
            return _innermost(action.choices[getattr(ns, action.dest)], ns)
    return parser


def _all_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` and of its subcommands."""
    out = list(parser._option_string_actions)  # argparse offers no public way to list them
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _all_flags(sub)
    return out


def path_arg(text: str) -> Path:
    """A path argument; an empty one is refused (``Path("")`` would be the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:  # (a run written there could not be read back: safetensors takes UTF-8 paths)
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8; lstmkit's files need UTF-8 names") from None
    return Path(text)


_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → ``(key, value)``; the value is read as JSON if it is JSON (``100``,
    ``1e-3``, ``true``, ``null``), else kept as text; ``True``, ``False`` and ``None`` are read as
    ``true``, ``false`` and ``null`` (``lstmkit tasks`` shows defaults in Python's spelling); dashes
    in the key become underscores."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value = _PYTHON_LITERALS.get(value, value)
    try:
        json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value
    try:
        return key.replace("-", "_"), loads_json(value, key)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _TaskOptions(argparse.Action):
    """``-o KEY=VALUE``, repeatable, into one dict; a later value of a key replaces an earlier one
    (as ``git -c`` does: a script's defaults first, then what overrides them)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        key, value = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: value})  # (default not mutated)


def add_task_options(parser: argparse.ArgumentParser, example: str) -> None:
    """``-o/--option KEY=VALUE`` (repeatable) on ``parser``: ``args.option`` is a dict of the task
    options given, keys with underscores (:func:`key_value`)."""
    parser.add_argument("-o", "--option", type=key_value, action=_TaskOptions, default={}, metavar="KEY=VALUE",
                        help=f"task option, e.g. -o {example} (repeatable; a key's last value counts)")


def default_text(f: dataclasses.Field[Any]) -> str:
    """A field's default as the command line writes it."""
    opt = option_of(f)
    value = f.default
    if value is None:
        return opt.none_word if opt.optional else "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parser_of(name: str, opt: Option) -> Any:
    def parse(text: str) -> Any:
        if opt.optional and text.lower() in ("none", opt.none_word):
            return None
        if opt.kind is str:
            return text
        try:
            value = opt.kind(text)
            if opt.optional and opt.none_word[:1].isdigit() and value == opt.kind(opt.none_word):
                return None  # (--clip 0.0 as --clip 0)
            return value
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an int' if opt.kind is int else 'a number'}, got {text!r}") from None

    parse.__name__ = name
    return parse


def add_config_options(parser: Any, *, only: Iterable[str] | None = None,
                       exclude: Iterable[str] = TASK_FIELDS) -> None:
    """One option per :class:`TrainConfig` field, with its help and default in ``--help``.

    Nothing is stored for an option that is not given (``default=SUPPRESS``): the
    namespace holds exactly the settings the user typed, for
    :meth:`TrainConfig.for_task`.

    Args:
        only: these fields (default: all but ``exclude``).
    """
    names = set(only) if only is not None else None
    skip = set(exclude)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip or (names is not None and f.name not in names):
            continue
        opt = option_of(f)
        flags = opt.flags or (f"--{f.name.replace('_', '-')}",)
        help_text = f"{opt.help} (default: {default_text(f)})"
        if opt.kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        metavar = None if opt.choices else {int: "N", float: "X"}.get(opt.kind, "NAME")
        parser.add_argument(*flags, dest=f.name, type=_parser_of(f.name, opt),
                            choices=opt.choices or None, metavar=metavar, default=argparse.SUPPRESS, help=help_text)


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` settings given on the command line (and only those)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(TASK_FIELDS)
    return {k: v for k, v in vars(args).items() if k in names}
