"""The configuration convention of every service: one dataclass, flags, `XLLM_*` env vars, checked at start.

    @dataclass
    class RouterConfig:
        nats: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
        metrics_port: int = opt(9101, "Prometheus metrics port (0 = off)", min=0, max=65535)

    config = load_config(RouterConfig, sys.argv[1:], prog="python -m services.router")

Each field becomes a `--kebab-case` flag (bools: `--flag` / `--no-flag`) whose default is read from the
env var `XLLM_<UPPER_SNAKE>` when set, else from the dataclass. Supported types: str, int, float, bool,
their `| None` forms (an empty value means None) and sequences, comma-separated: tuple[str, ...]
(immutable, so a plain default works) or list[str] (opt copies the default per instance).
Field metadata (via `opt`): help, min, max (inclusive), choices, env (another env var name).
A dataclass may define `validate(self)` for cross-field rules (raise ValueError). Any bad value, from a
flag or from the environment, stops the program with a clear message and exit code 2 (argparse's).
"""

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "XLLM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = object()  # no default given beside the dataclass's


def opt(
    default: Any,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[Any] | None = None,
    env: str | None = None,
) -> Any:
    """A dataclass field with the metadata `load_config` reads. Lists get a copied default."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "env": env}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_nats_url(url: str) -> None:
    """For a config's `validate()`: ValueError unless `url` is one or more NATS URLs."""
    if not all(u.strip().startswith(("nats://", "tls://", "ws://", "wss://")) for u in url.split(",")):
        raise ValueError(f"--nats {url!r}: expected nats://host:port[,nats://host:port...]")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def load_config(
    cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None, defaults: Mapping[str, Any] | None = None
) -> T:
    """Parse `argv` (default: sys.argv[1:]) and the environment into a validated `cls` instance. `defaults`
    (field name -> value, say from a file `xllm tune` wrote) replace the dataclass's defaults: a flag or an env
    var still wins over them."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip() or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(defaults or ()) - set(fields))
    if unknown:
        parser.error(f"unknown settings {', '.join(unknown)}")
    specs = [_Spec(f, hints[f.name], (defaults or {}).get(f.name, _NONE)) for f in fields.values()]
    for spec in specs:
        spec.add_to(parser)
    ns = parser.parse_args(argv)
    values = {}
    for spec in specs:
        value = getattr(ns, spec.field.name)
        problem = spec.check_range(value)
        if problem:
            parser.error(f"{spec.flag} (or {spec.env}): {problem}")
        values[spec.field.name] = value
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            parser.error(str(e))
    return config


class _Spec:
    """How one dataclass field maps to a flag and an env var."""

    def __init__(self, field: dataclasses.Field, hint: Any, given: Any = _NONE):
        self.field, self.given = field, given
        self.meta = field.metadata
        self.flag = "--" + field.name.replace("_", "-")
        self.env = self.meta.get("env") or env_name(field.name)
        self.base, self.optional, self.seq = _unwrap(hint)  # seq: list, tuple or None (a scalar)
        self.convert = _converter(self.base, self.optional, self.seq)

    def default(self) -> Any:
        if self.given is not _NONE:
            return self.seq(self.given) if self.seq and self.given is not None else self.given
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        default = self.default()
        raw = os.environ.get(self.env)
        if raw is not None:
            try:
                default = self.convert(raw)
            except (argparse.ArgumentTypeError, ValueError) as e:
                parser.error(f"{self.env}={raw!r}: {e}")
        no_default = (
            self.given is _NONE
            and self.field.default is dataclasses.MISSING
            and self.field.default_factory is dataclasses.MISSING
        )
        required = no_default and raw is None
        help_text = self.meta.get("help", "") or ""
        help_text += f" [env {self.env}; default: %(default)s]"
        kwargs: dict[str, Any] = {"dest": self.field.name, "default": default, "help": help_text}
        if self.base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = self.convert
            choices = self.meta.get("choices")
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}" if choices else self.base.__name__.upper()
            kwargs["required"] = required
        parser.add_argument(self.flag, **kwargs)

    def check_range(self, value: Any) -> str | None:
        """A message saying why `value` is out of range, or None if it is fine."""
        items = (value or ()) if self.seq else [value]
        lo, hi, choices = self.meta.get("min"), self.meta.get("max"), self.meta.get("choices")
        for v in items:
            if v is None:
                continue
            if lo is not None and v < lo:
                return f"must be >= {lo}, got {v!r}"
            if hi is not None and v > hi:
                return f"must be <= {hi}, got {v!r}"
            if choices is not None and v not in choices:
                return f"must be one of {', '.join(map(str, choices))}; got {v!r}"
        return None


def _unwrap(hint: Any) -> tuple[type, bool, Any]:
    """(base type, optional?, sequence type or None) of a field's type hint."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {hint!r}")
        hint, optional = args[0], True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    is_seq = (origin is list and len(args) == 1) or (origin is tuple and args[1:] == (Ellipsis,))
    if is_seq:
        if args[0] not in (str, int, float):
            raise TypeError(f"unsupported config field type {hint!r}")
        return args[0], optional, origin
    if hint not in (str, int, float, bool):
        raise TypeError(f"unsupported config field type {hint!r}")
    return hint, optional, None


def _converter(base: type, optional: bool, seq: Any) -> Callable[[Any], Any]:
    def one(text: str) -> Any:
        if base is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")
        if base is str:
            return text
        try:
            return base(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None

    def convert(text: str) -> Any:
        if optional and (text == "" or (base is not str and text.strip().lower() in ("none", "null"))):
            return None
        if seq:
            return seq(one(part.strip()) for part in text.split(",") if part.strip())
        return one(text)

    return convert
