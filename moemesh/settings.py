"""Settings from flags and the environment: one mechanism for every moemesh service.

Each service declares one frozen dataclass; every field that is a flag says so once, with
`option(...)` (its flag, help, parser, default, choices) in the field's metadata. The class names
its environment prefix in `ENV_PREFIX` (e.g. "MOEMESH_GATEWAY_"); a flag's variable is the prefix
plus the flag in upper case with '_' for '-' (--max-inflight -> MOEMESH_GATEWAY_MAX_INFLIGHT).

    @dataclass(frozen=True)
    class GatewaySettings:
        ENV_PREFIX: ClassVar[str] = "MOEMESH_GATEWAY_"
        coordinator: str = option("--coordinator", "coordinator HOST:PORT")        # required
        port: int = option("--port", "port to bind", int, default=50051)

`add_options(parser, Settings)` adds the flags (all default to None, so the environment can fill
what the command line leaves unset); `settings_from(Settings, args, environ)` resolves each field:
flag > environment variable > default. A field without a default is required. Booleans are
switches: giving `--flag` (or `1/true/yes/on` in its variable; `0/false/no/off/""` = not given)
turns the field from its default to the opposite, so `--verbose` sets a False default True and
`--no-progress` sets a True default False. A bad variable, a value outside `choices` or a missing
required field is a ConfigError naming the flag and the variable. Only a CLI (its main()/runner)
passes `os.environ` in; nothing else reads it.

One-shot tools (`moemesh plan`, `bench`, ...) declare `ENV_PREFIX = None`: their flags have no
variables, so a command line alone says what ran. A field may still name its variable with
`env="..."` (e.g. one several commands share), and a flag without leading dashes ("file") is a
positional argument (never from the environment). `many=True` makes a flag take one or more
values (`--workers 2 4 8`, its variable "2 4 8" or "2,4,8"): the field is a tuple. A flag whose help
is `argparse.SUPPRESS` is left out of --help (an internal flag). A stand-alone script (scripts/)
calls `parse_settings(Settings, argv, description)`: its parser, flags and settings in one call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar

from moemesh.errors import ConfigError

S = TypeVar("S")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_KEY = "moemesh.option"


def parse_bool(text: str) -> bool:
    """'1/true/yes/on' -> True, '0/false/no/off/' (empty) -> False, case-insensitive."""
    value = text.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE[:-1])} (or empty)")


@dataclass(frozen=True)
class Option:
    """How one settings field is given: its flag, help, parser and allowed values."""

    flag: str  # "--name", or a positional argument's name ("file")
    help: str
    parse: Callable[[str], Any]
    choices: tuple[Any, ...] | None = None
    variable: str | None = None  # its environment variable when not ENV_PREFIX + flag
    metavar: str | None = None
    many: bool = False  # one or more values (nargs="+"); the field is a tuple

    @property
    def is_switch(self) -> bool:
        return self.parse is parse_bool

    @property
    def is_positional(self) -> bool:
        return not self.flag.startswith("-")

    def env(self, prefix: str | None) -> str | None:
        """Its environment variable: `variable`, else prefix + FLAG_NAME; None when it has none."""
        if self.variable is not None:
            return self.variable
        if prefix is None or self.is_positional:
            return None
        return prefix + self.flag.removeprefix("--").replace("-", "_").upper()


def option(flag: str, help: str, parse: Callable[[str], Any] = str, *, default: Any = MISSING,
           choices: Sequence[Any] | None = None, env: str | None = None, metavar: str | None = None,
           many: bool = False) -> Any:
    """A dataclass field that is also a flag (and an environment variable); no default = required.
    A switch (parse=parse_bool) needs a bool default: giving it turns the field to the opposite.
    `many`: the flag takes one or more values, each parsed (and checked against `choices`): a tuple."""
    assert parse is not parse_bool or isinstance(default, bool), f"switch {flag} needs a bool default"
    assert not many or (flag.startswith("-") and parse is not parse_bool), f"{flag}: only a valued flag takes many"
    meta = {_KEY: Option(flag, help, parse, tuple(choices) if choices is not None else None, env, metavar, many)}
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def options(cls: type) -> Iterator[tuple[Field, Option]]:
    """(field, option) for every field of `cls` declared with `option(...)`, in declaration order."""
    for f in fields(cls):
        opt = f.metadata.get(_KEY)
        if opt is not None:
            yield f, opt


def env_prefix(cls: type) -> str | None:
    """`cls.ENV_PREFIX`: "MOEMESH_<SERVICE>_", or None for a tool whose flags have no variables."""
    prefix = getattr(cls, "ENV_PREFIX", MISSING)
    assert prefix is None or isinstance(prefix, str), f"{cls.__name__} must declare ENV_PREFIX (a str, or None)"
    return prefix


def _help(f: Field, opt: Option, variable: str | None) -> str:
    """The help line: the option's text, then (required / env VARIABLE / default VALUE)."""
    if opt.help == argparse.SUPPRESS:
        return opt.help  # an internal flag: not listed
    notes = ["required"] if f.default is MISSING and not opt.is_positional else []
    notes += [f"env {variable}"] if variable else []
    if f.default is not MISSING and not opt.is_switch:
        shown = " ".join(str(v) for v in f.default) if opt.many else f.default
        notes.append(f"default {'none' if shown is None else shown}")
    return f"{opt.help} ({'; '.join(notes)})" if notes else opt.help


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per option of `cls`; each defaults to None (unset), the help names its variable."""
    prefix = env_prefix(cls)
    for f, opt in options(cls):
        help_text = _help(f, opt, opt.env(prefix))
        if opt.is_positional:
            parser.add_argument(f.name, metavar=opt.metavar or opt.flag, type=opt.parse, choices=opt.choices,
                                nargs=None if f.default is MISSING else "?", default=None, help=help_text)
        elif opt.is_switch:
            parser.add_argument(opt.flag, dest=f.name, action="store_const", const=True, default=None,
                                help=help_text)
        else:
            metavar = opt.metavar or (None if opt.choices else opt.flag.removeprefix("--").replace("-", "_").upper())
            parser.add_argument(opt.flag, dest=f.name, type=opt.parse, default=None, choices=opt.choices,
                                nargs="+" if opt.many else None, metavar=metavar, help=help_text)


def settings_from(cls: type[S], args: argparse.Namespace, environ: Mapping[str, str]) -> S:
    """`cls` from parsed flags, then `environ`'s variables, then the defaults (module docstring)."""
    prefix = env_prefix(cls)
    values: dict[str, Any] = {}
    for f, opt in options(cls):
        variable = opt.env(prefix)
        value = getattr(args, f.name, None)
        if value is None:
            value = _from_env(opt, variable, environ)
        if value is None and f.default is MISSING:
            raise ConfigError(f"{opt.flag} is required" + (f" (or set {variable})" if variable else ""))
        if opt.many and value is not None:
            value = tuple(value)  # argparse gives a list
        if opt.is_switch and value is not None:
            value = f.default if not value else not f.default  # given: the opposite of the default
        if value is not None:
            values[f.name] = value
    return cls(**values)


def parse_settings(cls: type[S], argv: Sequence[str] | None, description: str = "",
                   environ: Mapping[str, str] | None = None) -> S:
    """A stand-alone script's settings: a parser with `cls`'s flags reads `argv` (None: sys.argv), then
    `environ` (none unless passed), then the defaults. A ConfigError exits 2 with the usage, as a bad flag does."""
    parser = argparse.ArgumentParser(description=description)
    add_options(parser, cls)
    args = parser.parse_args(argv)
    try:
        return settings_from(cls, args, environ or {})
    except ConfigError as exc:
        parser.error(str(exc))


def _from_env(opt: Option, name: str | None, environ: Mapping[str, str]) -> Any:
    """The parsed value of variable `name`, None when unset (or no variable); ConfigError when bad."""
    if name is None or name not in environ:
        return None
    text = environ[name]
    items = text.replace(",", " ").split() if opt.many else [text]
    try:
        values = [opt.parse(item) for item in items]
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{name}={text!r} is not valid for {opt.flag}: {exc}") from None
    if opt.many and not values:
        raise ConfigError(f"{name}={text!r} is not valid for {opt.flag}: give one or more values")
    if opt.choices is not None and any(value not in opt.choices for value in values):
        choices = ", ".join(str(c) for c in opt.choices)
        raise ConfigError(f"{name}={text!r} is not valid for {opt.flag}: choose one of {choices}")
    return tuple(values) if opt.many else values[0]
