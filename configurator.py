"""
Settings for every script: a dataclass of typed fields, filled from config files and
command-line overrides, checked before any work starts.

    python train.py config/train_facts.py --batch_size=32 --dropout=0 --knn=[0,0,5]

A config file is plain Python (`n_layer = 6`) run in a namespace of its own; its public names
become settings. `--key=value` is parsed by the field's declared type. An unknown key stops
the script with the closest valid names; a value of the wrong type names the field and type.
"""

import ast
import dataclasses
import difflib
import os
import runpy
import sys
import types
import typing


class ConfigError(ValueError):
    pass


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _coerce(name: str, value, tp):
    """Check `value` against the type annotation `tp`, converting where it is lossless
    (int -> float, list -> tuple). Strings coming from the command line are parsed first."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None, X | Y
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} is not a valid {_type_name(tp)}")
    if tp is typing.Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a {_type_name(tp)}, got {value!r}")
        inner = args[0] if args else typing.Any
        items = [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be a {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_cli_value(raw: str, tp):
    """Command-line text -> Python value: literals (numbers, lists, None, True) are parsed,
    anything else stays a string (`--dataset=facts` needs no quotes). Booleans also accept
    true/false/yes/no/1/0, since that is what people type."""
    wants_bool = tp is bool or bool in typing.get_args(tp)
    if wants_bool and raw.lower() in ("true", "yes", "1", "false", "no", "0"):
        return raw.lower() in ("true", "yes", "1")
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() == "none":
            return None
        return raw


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    namespace = runpy.run_path(path)
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def load_config(cls, argv: list[str] | None = None, **overrides):
    """Build a `cls` settings dataclass from argv (config files, then --key=value overrides,
    applied in order). Keyword arguments act as overrides too (what tests use)."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict = {}

    def put(key, value, source):
        if key not in fields:
            raise ConfigError(f"unknown setting '{key}' in {source}{_suggest(key, fields)}")
        values[key] = _coerce(key, value, hints[key])

    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override '{arg}' needs a value: --{key}=VALUE")
            if key not in fields:
                raise ConfigError(f"unknown setting '{key}' on the command line{_suggest(key, fields)}")
            put(key, _parse_cli_value(raw, hints[key]), "the command line")
        else:
            for key, value in read_config_file(arg).items():
                put(key, value, arg)
    for key, value in overrides.items():
        put(key, value, "the keyword arguments")
    return cls(**values)


def format_config(cfg) -> str:
    return "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(cfg).items())
